"""Type checks of the `TreeLoraConfig` fields that name modules and layers, so that a wrong type is refused when the
config is made, naming the field and what is allowed, instead of failing later inside PEFT with a bare TypeError."""

from __future__ import annotations

from collections.abc import Collection


def check_module_fields(config) -> None:
    _names_or_regex("target_modules", config.target_modules, example="['q_proj', 'v_proj'], a regex or 'all-linear'")
    _names_or_regex("exclude_modules", config.exclude_modules, example="['lm_head'] or a regex")
    _names_or_regex("layers_pattern", config.layers_pattern, example="'layers' or ['layers', 'h']")
    layers = config.layers_to_transform
    if layers is not None and not (_index(layers) or (_collection(layers) and all(_index(i) for i in layers))):
        raise ValueError(
            "TreeLoraConfig.layers_to_transform must be None, a layer index (an integer >= 0) or a list of them, "
            f"e.g. [0, 1]; got {layers!r}."
        )
    saved = config.modules_to_save
    if saved is not None and (not _collection(saved) or not all(_name(n) for n in saved)):
        raise ValueError(
            f"TreeLoraConfig.modules_to_save must be None or a list of module names, e.g. ['lm_head']; got {saved!r}."
        )


def _names_or_regex(field: str, value: object, example: str) -> None:
    if value is None or _name(value):
        return
    if _collection(value) and all(_name(name) for name in value):
        return
    raise ValueError(
        f"TreeLoraConfig.{field} must be None, a string (a regex) or a list of module names, e.g. {example}; "
        f"got {value!r}."
    )


def _name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _collection(value: object) -> bool:
    return isinstance(value, Collection) and not isinstance(value, (str, bytes, dict))


def check_config_file(config_file: str) -> None:
    """Refuse an `adapter_config.json` that cannot be a TreeLoRA config, naming the file: not JSON (or empty), not
    a JSON object, no `peft_type`, or another one."""
    import json

    from .registration import METHOD_NAME

    with open(config_file, encoding="utf-8") as file:
        text = file.read()
    if not text.strip():
        raise ValueError(f"{config_file} is empty; an adapter_config.json holds the adapter's settings as JSON.")
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{config_file} holds a JSON {type(loaded).__name__}, not an object; an adapter_config.json is one JSON "
            'object of settings, like {"peft_type": "TREELORA", "depth": 3, ...}.'
        )
    peft_type = loaded.get("peft_type")
    if peft_type is None:
        raise ValueError(
            f'{config_file} has no "peft_type"; a TreeLoRA adapter_config.json has "peft_type": "TREELORA".'
        )
    if peft_type != METHOD_NAME.upper():
        raise ValueError(
            f'{config_file} says "peft_type": {peft_type!r}, so it is no TreeLoRA adapter ("peft_type": "TREELORA"); '
            "load it with peft.PeftConfig.from_pretrained or the config class of that method."
        )
