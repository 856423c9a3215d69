"""Recipe parsing: mergekit's format, parameter resolution, and errors that name the line and key."""

from __future__ import annotations

import pytest

from mergekit_lite.dispatch import parse_recipe, pipeline_for
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import get_method
from mergekit_lite.params import gradient_value, recipe_params, resolve_value

MERGEKIT_TIES = """\
models:
  - model: base
  - model: a
    parameters:
      density: 0.5
      weight: 0.5
  - model: b
    parameters:
      density: [1, 0.7, 0.1]
      weight:
        - filter: mlp
          value: 0.2
        - value: 1.0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_recipe_parses_unchanged():
    recipe, _ = parse_recipe(MERGEKIT_TIES)
    assert recipe.merge_method == "ties" and recipe.dtype == "float16"
    method = get_method("ties")
    a = recipe_params(recipe, method, 1, "model.layers.0.mlp.up_proj.weight", 0, 3)
    b = recipe_params(recipe, method, 2, "model.layers.0.mlp.up_proj.weight", 0, 3)
    assert a == {"weight": 0.5, "density": 0.5}
    assert b == {"weight": 0.2, "density": 1.0}
    b_attn = recipe_params(recipe, method, 2, "model.layers.2.self_attn.q_proj.weight", 2, 3)
    assert b_attn == {"weight": 1.0, "density": pytest.approx(0.1)}
    glob = recipe_params(recipe, method, None, "x", None, 3)
    assert glob["normalize"] is True and glob["lambda"] == 1.0 and glob["trim_scope"] == "tensor"


def test_exponent_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-9 as a string; recipes read it as the number users mean (as YAML 1.2 and JSON do)."""
    recipe, _ = parse_recipe("merge_method: pleas\nmodels: [{model: a}, {model: b}]\ndata: {kind: generic}\n"
                             "parameters: {ridge: 1e-9, samples: 2E+2}\n")
    assert recipe.parameters["ridge"] == pytest.approx(1e-9) and recipe.parameters["samples"] == 200
    recipe, _ = parse_recipe("merge_method: linear\nmodels: [{model: 1e5x}, {model: b}]\n")
    assert recipe.models[0].model == "1e5x"


def test_gradient_interpolates_over_layers():
    points = [0.0, 1.0, 0.0]
    values = [gradient_value(points, f"layers.{i}.w", i, 5) for i in range(5)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert gradient_value(points, "model.embed_tokens.weight", None, 5) == 0.0
    assert gradient_value([0.2, 0.8], "lm_head.weight", None, 5) == 0.2  # outside the layers: the first point
    assert gradient_value([0.2, 0.8], "model.norm.weight", None, 5) == 0.2


def test_a_filter_list_without_a_match_falls_through_to_the_global_value_then_the_default():
    """As in mergekit: a per-model filter list with no entry for a tensor leaves the recipe-wide value, and a
    recipe-wide one with no entry leaves the default; `*` matches every tensor."""
    recipe, _ = parse_recipe("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters:\n"
                             "      weight: [{filter: mlp, value: 0.2}]\n      density: [{filter: '*', value: 0.3}]\n"
                             "  - model: b\nparameters:\n  weight: [{filter: attn, value: 0.7}]\n")
    assert resolve_value(recipe.models[0].parameters["weight"], "attn.w", 0, 2) is None
    method = pipeline_for("ties")
    mlp = recipe_params(recipe, method, 0, "layers.0.mlp.w", 0, 2)
    attn = recipe_params(recipe, method, 0, "layers.0.attn.w", 0, 2)
    other = recipe_params(recipe, method, 0, "layers.0.norm.w", 0, 2)
    assert (mlp["weight"], attn["weight"], other["weight"]) == (0.2, 0.7, 1.0)
    assert mlp["density"] == attn["density"] == other["density"] == 0.3


def test_keys_mergekit_accepts_but_this_method_does_not_use_are_warnings():
    recipe, _ = parse_recipe("merge_method: linear\nmodel_name: my-merge\nmodels:\n  - model: a\n    parameters:\n"
                             "      weight: 1.0\n      density: 0.5\n  - model: b\n"
                             "parameters: {int8_mask: true, normalize: 1.0}\n")
    warnings = "\n".join(recipe.warnings)
    for needle in ("<recipe>:2: model_name: ignored", "models[0].parameters.density: linear does not use density",
                   "parameters.int8_mask: linear does not use int8_mask", "parameters.normalize: 1.0 read as True"):
        assert needle in warnings, warnings
    # what is ignored is gone from the recipe the merge (and its report) sees
    assert recipe.parameters == {"normalize": True} and recipe.models[0].parameters == {"weight": 1.0}
    recipe, _ = parse_recipe("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n"
                             "      lambda: 2\n")
    assert "models[0].parameters.lambda: lambda is recipe-wide" in recipe.warnings[0]
    assert recipe.models[0].parameters == {}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nbogus: 1\n", "<recipe>:4: bogus: unknown key"),
        ("merge_method: nope\nmodels: [{model: a}]\n", "<recipe>:1: unknown merge_method 'nope'"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      densty: 0.5\n",
         "<recipe>:6: models[0].parameters.densty: unknown parameter for ties (did you mean density?)"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nbase_modle: c\n",
         "<recipe>:4: base_modle: unknown key (did you mean base_model?)"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, paramters: {density: 0.5}}]\n",
         "models[0].paramters: unknown key (did you mean parameters?)"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {wombat: 1}\n",
         "parameters.wombat: unknown parameter for ties (known:"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      density: 1.5\n",
         "<recipe>:6: models[0].parameters.density: must be at most 1"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      density: 0\n",
         "must be greater than 0"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      weight: heavy\n",
         "weight: must be a number"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {normalize: 3}\n", "must be true or false"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {trim_scope: layer}\n",
         "must be one of tensor, model"),
        ("merge_method: ties\nmodels: [{model: a}]\n", "ties needs base_model"),
        ("merge_method: slerp\nbase_model: b\nmodels: [{model: b}, {model: a}, {model: c}]\n", "at most 1 model"),
        ("merge_method: model_stock\nbase_model: b\nmodels: [{model: a}]\n", "at least 2 model"),
        ("models: [{model: a}]\n", "merge_method: required key is missing"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ndtype: float7\n", "unknown dtype"),
        ("merge_method: ties\n  base_model: [\n", "invalid YAML"),
        ("- just a list\n", "must be a YAML mapping"),
        ("merge_method: passthrough\nslices: []\n", "give at least one slice"),
    ],
)
def test_recipe_errors_name_line_and_key(text, needle):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    assert needle in str(info.value)
