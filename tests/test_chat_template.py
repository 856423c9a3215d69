"""`chat_template:` in a recipe (a name, `auto`, or a literal Jinja template) is written into the output's
tokenizer, where transformers reads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from typer.testing import CliRunner

from mergekit_lite import merge
from mergekit_lite.chat_templates import NAMED_TEMPLATES, choose_chat_template
from mergekit_lite.cli import app
from mergekit_lite.errors import RecipeError

runner = CliRunner()
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]


def linear_recipe(family: dict, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(family["expert1"])}, {"model": str(family["expert2"])}],
            **extra}


def with_template(source: Path, target: Path, template: str | None) -> Path:
    """A copy of a checkpoint whose tokenizer_config.json carries `template`."""
    shutil.copytree(source, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    return target


def test_a_named_template_is_what_the_output_tokenizer_renders(tmp_path, llama_family):
    merge(linear_recipe(llama_family, chat_template="chatml"), tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == NAMED_TEMPLATES["chatml"]
    text = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == NAMED_TEMPLATES["chatml"]


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_every_named_template_renders_a_conversation(tmp_path, llama_family, name):
    merge(linear_recipe(llama_family, chat_template=name), tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=name != "mistral")
    positions = [text.find(message["content"]) for message in CONVERSATION]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), text


def test_auto_takes_the_template_most_inputs_carry(tmp_path, llama_family):
    common = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    base = with_template(llama_family["base"], tmp_path / "base", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    first = with_template(llama_family["expert1"], tmp_path / "e1", common)
    second = with_template(llama_family["expert2"], tmp_path / "e2", common + "\n")  # the same once stripped
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "chat_template": "auto",
              "models": [{"model": str(first), "parameters": {"weight": 1.0}},
                         {"model": str(second), "parameters": {"weight": 1.0}}]}
    merge(recipe, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == common
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())


def test_auto_without_templates_in_the_inputs_writes_none_and_literals_are_kept():
    assert choose_chat_template("auto", [None, None]) is None
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert choose_chat_template(literal, []) == literal
    assert choose_chat_template("auto", ["b", "a", "a", "b"]) == "b"  # a tie goes to the first input's


def test_an_unknown_name_is_refused_at_its_line_before_any_work(tmp_path, llama_family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {llama_family['expert1']}\nchat_template: chatmk\n")
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 2 and "r.yaml:4" in result.stderr and "chatml" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError):
        choose_chat_template("{x}", [])


def test_without_a_tokenizer_the_template_is_a_warning(tmp_path, llama_family):
    report = merge(linear_recipe(llama_family, chat_template="chatml"), tmp_path / "out", copy_tokenizer=False)
    assert any("chat_template: not written" in warning for warning in report["warnings"])
    assert not (tmp_path / "out" / "chat_template.jinja").exists()
