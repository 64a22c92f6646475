import pytest

from studio.config import ConfigError, LoraSettings, RunConfig, field_help, load_config, parse_layers


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = RunConfig().validate()
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp"))  # atomic save leaves no temporary file


@pytest.mark.parametrize("value, expected", [("0-3,8", [0, 1, 2, 3, 8]), ("5", [5]), ([2, 1, 2], [1, 2]),
                                             (4, [4]), ("", None), (None, None), (" 1 - 2 ", [1, 2])])
def test_parse_layers_accepts_ranges_lists_and_ints(value, expected):
    assert parse_layers(value) == expected


@pytest.mark.parametrize("bad", ["a-b", "3-1", "-1", "1,,x", [-1], [1.5], True])
def test_parse_layers_names_the_bad_value(bad):
    with pytest.raises(ConfigError, match="--layers"):
        parse_layers(bad)


@pytest.mark.parametrize("field, value, needle", [
    ("r", 0, "lora.r must be an integer >= 1, got 0"),
    ("lora_alpha", 0, "lora.lora_alpha must be a number > 0, got 0"),
    ("lora_alpha", -2.0, "got -2.0"),
    ("lora_dropout", 1.0, "lora.lora_dropout must be in [0.0, 1.0), got 1.0"),
    ("lora_dropout", -0.1, "got -0.1"),
    ("bias", "some", "lora.bias = 'some' is not one of: none, all, lora_only"),
    ("target_modules", [], "non-empty list"),
])
def test_lora_checks_name_field_and_value(field, value, needle):
    s = LoraSettings(**{field: value})
    with pytest.raises(ConfigError) as e:
        s.validate()
    assert needle in str(e.value)


def test_unknown_key_suggests_the_nearest_valid_one(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  lora_alpah: 16\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key lora.lora_alpah; did you mean lora.lora_alpha\?"):
        load_config(p)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name_or_path: tiny-llama\n lora: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(p)


def test_wrong_types_are_refused_with_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError, match="train.learning_rate must be a number, got 'fast'"):
        load_config(p)
    p.write_text("train:\n  learning_rate: -1e-4\n")
    with pytest.raises(ConfigError, match="train.learning_rate must be a number > 0"):
        load_config(p)
    p.write_text("data:\n  packing: 'yes'\n")
    with pytest.raises(ConfigError, match="data.packing must be true or false"):
        load_config(p)


def test_yaml_scientific_notation_strings_become_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 2e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(p).train.learning_rate == pytest.approx(2e-4)


def test_every_field_has_help_text():
    import dataclasses

    from studio.config import SECTIONS

    for klass in SECTIONS.values():
        helps = field_help(klass)
        for f in dataclasses.fields(klass):
            assert helps.get(f.name), f"{klass.__name__}.{f.name} has no docstring"


def test_scaling_follows_rslora():
    assert LoraSettings(r=16, lora_alpha=32).scaling == 2.0
    assert LoraSettings(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
