import pytest
import yaml

from conftest import RECIPES, write_recipe
from edgekd.errors import RecipeError
from edgekd.recipe import load_recipe, recipe_from_dict


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_and_sweep_loads(path):
    if path.stem.endswith("_sweep"):
        from edgekd.sweep import load_sweep

        assert load_sweep(path).name == path.stem
        return
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_misspelt_key_names_the_key_and_the_closest_valid_one(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path, train={"bacth_size": 8})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "train.bacth_size" in str(err.value)
    assert "did you mean train.batch_size" in str(err.value)


def test_misspelt_section_and_model_argument(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path, trian={"epochs": 1})
    with pytest.raises(RecipeError, match="did you mean train"):
        load_recipe(path)
    path = write_recipe(tmp_path / "r2.yaml", tmp_path, model={"blocs": 4})
    with pytest.raises(RecipeError, match="did you mean model.blocks"):
        load_recipe(path)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "optimizer", "adamm", "'adamm' is not one of adam, adamw, sgd, adam8bit; did you mean adam"),
    ("distill", "alpha", 1.5, "distill.alpha: 1.5 must be in [0, 1]"),
    ("distill", "temperature", 0, "distill.temperature: 0.0 must be > 0"),
    ("train", "lr", -0.1, "train.lr: -0.1 must be > 0"),
    ("train", "epochs", "five", "train.epochs: expected an integer, got 'five'"),
    ("data", "image_size", 4, "data.image_size: 4 must be >= 8"),
    ("model", "blocks", 0, "blocks=0"),
])
def test_bad_values_name_key_value_and_rule(tmp_path, section, key, value, message):
    path = write_recipe(tmp_path / "r.yaml", tmp_path, **{section: {key: value}})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)


def test_unknown_model_lists_valid_models(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path, model={"name": "resnet19"})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "unknown model 'resnet19'" in str(err.value)
    assert "paper_cnn" in err.value.hint and "resnet18" in err.value.hint


def test_overrides_apply_with_yaml_types(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path)
    recipe = load_recipe(path, ["train.epochs=7", "train.lr=1e-3", "model.classifier=[8, 4]",
                                "distill.T=3", "name=other"])
    assert recipe.train.epochs == 7
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.model.args["classifier"] == [8, 4]
    assert recipe.distill.temperature == 3.0
    assert recipe.name == "other"


def test_malformed_override_is_refused(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path)
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(path, ["train.epochs"])
    with pytest.raises(RecipeError, match="did you mean train.epochs"):
        load_recipe(path, ["train.epoch=3"])


def test_resolved_recipe_round_trips_and_has_absolute_paths(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "relative/data")
    recipe = load_recipe(path)
    assert recipe.data.root == str(tmp_path / "relative" / "data")
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.to_dict() == recipe.to_dict()


def test_teacher_recipe_is_found_beside_the_student_recipe(tmp_path):
    recipe = load_recipe(RECIPES / "intel_8block.yaml")
    assert recipe.teacher.recipe == str(RECIPES / "intel_teacher.yaml")


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_paper_recipes_keep_every_improvement_off_and_plus_recipes_turn_them_on():
    for name in ("intel_teacher", "intel_8block", "intel_10block", "intel_6block", "intel_4block"):
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        train = recipe.train
        assert not recipe.augment.active and recipe.distill.method == "kd" and train.optimizer == "adam"
        assert (train.weight_decay, train.label_smoothing, train.warmup_epochs) == (0, 0, 0)
        assert train.scheduler == "none" and train.ema_decay is None and train.grad_clip is None
    for name in ("intel_teacher_plus", "intel_8block_plus"):
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        assert recipe.augment.active and recipe.train.scheduler == "cosine" and recipe.train.ema_decay
        assert recipe.train.optimizer == "adamw" and recipe.train.weight_decay > 0
    # Same model as the paper's: the parameter budget does not move.
    assert load_recipe(RECIPES / "intel_8block_plus.yaml").model.args == load_recipe(
        RECIPES / "intel_8block.yaml").model.args


@pytest.mark.parametrize("override, message", [
    ("augment.flipp=true", "unknown key augment.flipp; did you mean augment.flip?"),
    ("distill.method=dkdd", "'dkdd' is not one of kd, dkd, dist; did you mean dkd"),
    ("augment.crop=random", "'random' is not one of none, resized, pad"),
    ("train.label_smoothing=1.0", "must be in [0, 1)"),
    ("train.scheduler=cosin", "did you mean cosine"),
])
def test_new_training_options_are_validated(override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_recipe(RECIPES / "intel_8block_plus.yaml", [override])


@pytest.mark.parametrize("override, message", [
    ("data.image_size=100000", "data.image_size: 100000 is more than the largest sane value, 2,048"),
    ("augment.render_size=100000", "augment.render_size: 100000 is more than the largest sane value"),
    ("train.lr=1e30", "train.lr: 1e+30 is more than the largest sane value"),
    ("train.lr=.inf", "train.lr: inf is not a finite number"),
    ("train.lr=.nan", "train.lr: nan is not a finite number"),
    ("distill.temperature=-.inf", "distill.temperature: -inf is not a finite number"),
    ("train.checkpoint_seconds=1e400", "train.checkpoint_seconds: inf is not a finite number"),
    ("train.gamma=" + "9" * 400, "is not a finite number"),
    ("train.seed=99999999999999999999999", "train.seed: 99999999999999999999999 must be in [0, 4294967295]"),
    ("train.seed=-1", "train.seed: -1 must be in [0, 4294967295]"),
    ("data.split_seed=4294967296", "data.split_seed: 4294967296 must be in [0, 4294967295]"),
    ("train.batch_size=10000000", "train.batch_size: 10000000 is more than the largest sane value"),
    ("train.epochs=10000000", "train.epochs: 10000000 is more than the largest sane value"),
    ("model.width=1000000000000", "model: Storage size calculation overflowed"),
    ("model.width=100000", "parameters, more than the 1,000,000,000 edgekd trains"),
    ("data.root=[unclosed", "--set 'data.root=[unclosed': not valid YAML: expected ',' or ']'"),
    ("train..lr=3", "an empty key between dots"),
])
def test_values_out_of_range_or_unparsable_are_refused_before_work(tmp_path, override, message):
    path = write_recipe(tmp_path / "r.yaml", tmp_path)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert message in str(err.value)


def test_the_largest_sane_values_are_still_accepted(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path)
    recipe = load_recipe(path, ["data.image_size=2048", "train.seed=4294967295", "train.lr=10"])
    assert (recipe.data.image_size, recipe.train.seed, recipe.train.lr) == (2048, 2 ** 32 - 1, 10.0)


def test_duplicate_keys_are_refused_with_the_key_and_both_lines(tmp_path):
    (tmp_path / "dup.yaml").write_text("name: dup\ntrain:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "dup.yaml")
    assert "duplicate key 'lr' (first on line 3) (line 5, column 3)" in str(err.value)
    # a merge key (<<: *base) is how YAML overrides on purpose: not a duplicate
    (tmp_path / "merge.yaml").write_text(
        "name: merge\ndata: {root: x, image_size: 16}\ntrain: &t {epochs: 3, lr: 0.1}\n"
        "augment:\n  <<: {flip: true, crop: pad}\n  flip: false\n")
    recipe = load_recipe(tmp_path / "merge.yaml")
    assert (recipe.train.epochs, recipe.augment.flip, recipe.augment.crop) == (3, False, "pad")


@pytest.mark.parametrize("payload, message", [
    (b"\xff\xfe\x00\x01binary", "not a text file (byte 0 is not UTF-8)"),
    (b"name: ok\n\x00\x01\x02", "not valid YAML"),
    ("name: caf\u00e9\n".encode("latin-1"), "not a text file"),
    (b"a: &a [*a]\n", "an anchor refers to itself"),
    (b"- 1\n- 2\n", "a recipe is a mapping"),
    (b"train: !!python/object:os.system {}\n", "not valid YAML"),
])
def test_binary_non_utf8_and_hostile_yaml_recipes_are_refused(tmp_path, payload, message):
    (tmp_path / "r.yaml").write_bytes(payload)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(tmp_path / "r.yaml")


def test_a_huge_file_is_not_read_as_a_recipe(tmp_path):
    (tmp_path / "r.yaml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(RecipeError, match="is not a recipe"):
        load_recipe(tmp_path / "r.yaml")


def test_mixing_is_checked_when_the_recipe_loads(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path, augment={"mixup_probability": 1.0})
    assert load_recipe(path).augment.mixing and load_recipe(path).augment.active
    with pytest.raises(RecipeError, match="did you mean augment.mixup_alpha"):
        load_recipe(path, ["augment.mixup_alfa=0.2"])
    with pytest.raises(RecipeError, match=r"augment.cutmix_probability: 1.5 must be in \[0, 1\]"):
        load_recipe(path, ["augment.cutmix_probability=1.5"])
    with pytest.raises(RecipeError, match="augment.mixup_alpha: 0.0 must be > 0"):
        load_recipe(path, ["augment.mixup_alpha=0"])
    with pytest.raises(RecipeError, match=r"mixup_probability \+ augment.cutmix_probability is more than 1"):
        load_recipe(path, ["augment.cutmix_probability=0.5"])
    # stored views hold the teacher's logits on unmixed views: refused, naming the fix
    with pytest.raises(RecipeError, match="cannot use stored teacher views") as err:
        load_recipe(path, ["distill.teacher_views=4"])
    assert "--set distill.teacher_views=null" in err.value.hint
    with pytest.raises(RecipeError, match="dkd splits off one target class"):
        load_recipe(path, ["distill.method=dkd"])
    # without mixing, stored views keep the keys they had: the view fields alone, as before mixing existed
    from dataclasses import asdict

    plain = load_recipe(path, ["augment.mixup_probability=0", "augment.crop=resized", "distill.teacher_views=4"])
    assert set(asdict(plain.augment.views)) == {"crop", "crop_scale", "pad_fraction", "flip", "color_jitter",
                                                "render_size"}
