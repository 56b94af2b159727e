"""The built-in image tasks: layout, determinism to the byte, refusal to clobber foreign folders."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from models.demo_data import MARKER, TASKS, draw_image, val_per_class, write_demo_data
from service.cli import main
from tests.cli_help import assert_every_option_names_its_default, subparser


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_val_gets_a_quarter_of_train_and_at_least_ten() -> None:
    assert [val_per_class(n) for n in (1, 8, 40, 44, 100, 300)] == [10, 10, 10, 11, 25, 75]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tree_layout_counts_and_images(task: str, tmp_path: Path) -> None:
    data = write_demo_data(tmp_path / task, task=task, per_class=6, size=40, seed=3)
    assert data.classes == TASKS[task] and len(set(TASKS[task])) == 6
    for split, count in (("train", 6), ("val", 10)):
        assert sorted(p.name for p in (tmp_path / task / split).iterdir()) == sorted(TASKS[task])
        for name in TASKS[task]:
            files = sorted((tmp_path / task / split / name).iterdir())
            assert [f.name for f in files] == [f"{name}_{i:05d}.jpg" for i in range(count)]
    with Image.open(tmp_path / task / "val" / TASKS[task][0] / f"{TASKS[task][0]}_00009.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (40, 40))


def test_tasks_have_different_classes() -> None:
    assert not set(TASKS["shapes"]) & set(TASKS["glyphs"])


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_demo_data(tmp_path / name, task="glyphs", per_class=4, size=32, seed=seed)
    first, again, other = (_files(tmp_path / name) for name in "abc")
    assert len(first) == 6 * (4 + 10) + 1
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first if k.endswith(".jpg"))


def test_draw_image_takes_all_randomness_from_its_rng() -> None:
    random.seed(1)
    one = draw_image("shapes", "star", size=32, rng=random.Random(5)).tobytes()
    random.seed(2)  # the global RNG must not matter
    assert draw_image("shapes", "star", size=32, rng=random.Random(5)).tobytes() == one
    assert draw_image("shapes", "star", size=32, rng=random.Random(6)).tobytes() != one


def test_rewriting_replaces_a_previous_tree(tmp_path: Path) -> None:
    write_demo_data(tmp_path, task="shapes", per_class=12, size=32)
    write_demo_data(tmp_path, task="glyphs", per_class=2, size=32)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(TASKS["glyphs"])
    assert len(list((tmp_path / "train").rglob("*.jpg"))) == 12
    assert (tmp_path / MARKER).is_file()


def test_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="was not written by demo-data"):
        write_demo_data(tmp_path, per_class=1, size=32)
    assert (tmp_path / "train" / "cats").is_dir()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "animals"}, "task must be one of shapes, glyphs, found 'animals'"),
        ({"per_class": 0}, "expected per_class >= 1 and 16 <= size <= 1024, found 0 and 64"),
        ({"size": 8}, "expected per_class >= 1 and 16 <= size <= 1024, found 200 and 8"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as excinfo:
        write_demo_data(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert str(excinfo.value) == message
    assert not any(tmp_path.iterdir())


def test_draw_image_rejects_a_class_of_the_other_task() -> None:
    with pytest.raises(ValueError, match="class must be one of angle, arc"):
        draw_image("glyphs", "star", size=32, rng=random.Random(0))


def test_cli_demo_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo-data", str(tmp_path), "--task", "glyphs", "--per-class", "3", "--size", "24", "--seed", "1"]
    assert main(argv) == 0
    assert capsys.readouterr().out == (
        f"wrote {tmp_path}: glyphs, 6 classes (angle, arc, bars, crossing, tee, zigzag), "
        "3 train + 10 val images each, 24px\n"
    )
    assert len(list(tmp_path.rglob("*.jpg"))) == 6 * 13


def test_every_demo_data_option_names_its_default_in_help() -> None:
    parser = subparser("demo-data")
    assert_every_option_names_its_default(parser)
    assert "per class; val gets a quarter, at least 10 (default: 200)" in " ".join(parser.format_help().split())
