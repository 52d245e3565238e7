"""docs/configuration.md is what devtools/config_doc.py makes of the settings classes (as the lock files are checked
against pyproject in tests/test_packaging.py): a setting added, removed or redescribed without regenerating fails."""

from devtools import config_doc
from service import config


def test_the_committed_configuration_page_is_current():
    assert config_doc.DOC.read_text() == config_doc.render(), "stale: run python -m devtools.config_doc"
    assert config_doc.main(["--check"]) == 0


def test_every_setting_is_in_one_group_and_documented_under_its_variable():
    grouped = [name for group in config.GROUPS for name in group.model_fields]
    assert sorted(grouped) == sorted(config.Settings.model_fields) and len(set(grouped)) == len(grouped)
    page = config_doc.render()
    for name in grouped:
        assert f"`PUNKS_{name.upper()}`" in page
    assert page.count("\n## ") == len(config.GROUPS)


def test_types_and_defaults_read_as_written_in_the_environment():
    page = config_doc.render()
    assert "| `PUNKS_STEPS` | int, 1 to 100 | `25` |" in page
    assert "| `PUNKS_BATCH_BUCKETS` | list of int | `[1, 2, 4]` |" in page
    assert "| `PUNKS_API_TOKEN` | secret, optional | unset |" in page
    assert "| `PUNKS_COMPILE` | flag | `false` |" in page
