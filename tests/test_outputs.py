"""Output directories: a run replaces only an earlier run's own files, never the user's."""

from __future__ import annotations

import json
import os
import stat

import pytest

import peftkit
from peftkit.checkpoints import checkpoint_root
from peftkit.errors import PeftkitError
from peftkit.outputs import check_replaceable, owned_entries, write_directory


def small(tmp_path, data_dir, **changes):
    return {"model": "tiny-bert", "task": "sst2", "strategy": "lora", "data_dir": str(data_dir), "max_train_samples": 32,
            "max_eval_samples": 16, "epochs": 1, "select": "last", "output_dir": str(tmp_path / "run"), **changes}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_the_users_files_is_refused_flag_or_not(tmp_path, data_dir, overwrite):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train.csv").write_text("text,label\n")
    with pytest.raises(PeftkitError, match=r"holds no peftkit run \(notes.txt, train.csv\): peftkit never deletes"):
        peftkit.train(small(tmp_path, data_dir, overwrite=overwrite))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.csv"]
    assert not checkpoint_root(out).exists()


def test_overwrite_replaces_a_run_and_only_its_files(tmp_path, data_dir):
    out = tmp_path / "run"
    first = peftkit.train(small(tmp_path, data_dir))
    assert sorted(p.name for p in out.iterdir()) == first.record.files
    with pytest.raises(PeftkitError, match="holds a finished peftkit run: pass --overwrite to replace it"):
        peftkit.train(small(tmp_path, data_dir))
    (out / "notes.txt").write_text("mine")  # the user's file beside a run: refused even with --overwrite
    with pytest.raises(PeftkitError, match=r"holds a peftkit run and files it did not write \(notes.txt\)"):
        peftkit.train(small(tmp_path, data_dir, overwrite=True))
    (out / "notes.txt").unlink()
    second = peftkit.train(small(tmp_path, data_dir, overwrite=True, strategy="bitfit"))  # other files than lora's
    assert sorted(p.name for p in out.iterdir()) == second.record.files
    assert "adapter_model.safetensors" not in second.record.files


def test_a_checkpoint_folder_with_other_files_is_refused(tmp_path, data_dir):
    root = checkpoint_root(tmp_path / "run")
    root.mkdir()
    (root / "mine.txt").write_text("mine")
    with pytest.raises(PeftkitError, match="holds files that are not peftkit checkpoints .mine.txt."):
        peftkit.train(small(tmp_path, data_dir, overwrite=True))
    assert (root / "mine.txt").read_text() == "mine"


def test_replacing_keeps_a_file_put_in_the_folder_while_the_run_trained(tmp_path):
    out = tmp_path / "out"

    def run(name):
        def write(staging):
            (staging / name).write_text(name)
            (staging / "run.json").write_text('{"config": {}}')
        return write

    write_directory(out, run("a.safetensors"), "run.json")
    (out / "late.txt").write_text("mine")  # arrived after the check a run makes before it trains
    write_directory(out, run("b.safetensors"), "run.json")
    assert sorted(p.name for p in out.iterdir()) == ["b.safetensors", "late.txt", "run.json"]
    assert json.loads((out / "run.json").read_text())["files"] == ["b.safetensors", "run.json"]


def test_every_written_file_is_readable_as_the_umask_allows(tmp_path):
    def write(staging):
        secret = staging / "adapter_model.safetensors"
        secret.write_text("w")
        secret.chmod(0o600)  # as safetensors leaves it
        (staging / "run.json").write_text("{}")

    previous = os.umask(0o022)
    try:
        write_directory(tmp_path / "out", write, "run.json")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"adapter_model.safetensors": 0o644, "run.json": 0o644}


def test_a_record_from_before_the_file_list_owns_only_what_runs_wrote(tmp_path):
    for name in ("run.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "notes.md"):
        (tmp_path / name).write_text('{"config": {}}')
    assert owned_entries(tmp_path, "run.json") == {"run.json", "adapter_model.safetensors", "tokenizer.json", "README.md"}
    with pytest.raises(PeftkitError, match=r"files it did not write \(notes.md\)"):
        check_replaceable(tmp_path, "run.json", True, "run", "--output-dir")


@pytest.mark.real
def test_a_lora_run_of_a_packaged_model_is_portable_and_readable(tmp_path, data_dir):
    """The saved adapter names MiniLM by its hub id, in adapter_config.json and in PEFT's model
    card, never this machine's folder; every file is readable like the rest (0644 here)."""
    previous = os.umask(0o022)
    try:
        result = peftkit.train(small(tmp_path, data_dir, model="minilm", max_train_samples=16, max_eval_samples=8))
    finally:
        os.umask(previous)
    out = result.output_dir
    card = (out / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "base_model:adapter:sentence-transformers/all-MiniLM-L6-v2" in card and "site-packages" not in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_a_record_names_only_plain_entries_that_are_there(tmp_path):
    """A run.json listing '..' (or a path) owns nothing outside its folder: nothing there goes."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "userfile").write_text("mine")
    (out / "run.json").write_text(json.dumps({"config": {}, "files": ["..", "../userfile", "run.json"]}))
    assert owned_entries(out, "run.json") == {"run.json"}
    write_directory(out, lambda staging: (staging / "run.json").write_text('{"config": {}}'), "run.json")
    assert (tmp_path / "userfile").read_text() == "mine"


def test_a_json_file_that_is_no_run_record_owns_nothing(tmp_path):
    (tmp_path / "run.json").write_text('{"accuracy": 0.9}')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PeftkitError, match="holds no peftkit run"):
        check_replaceable(tmp_path, "run.json", True, "run", "--output-dir")


def test_a_new_output_never_takes_the_name_of_a_file_peftkit_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")  # arrived while the run trained, named like PEFT's model card

    def write(staging):
        (staging / "README.md").write_text("card")
        (staging / "run.json").write_text('{"config": {}}')

    with pytest.raises(PeftkitError, match="now holds files peftkit did not write .README.md.: they are kept"):
        write_directory(out, write, "run.json")
    assert (out / "README.md").read_text() == "mine"
    (kept,) = tmp_path.glob("out.new-*")
    assert (kept / "README.md").read_text() == "card"


def test_checkpoint_folders_of_other_names_and_a_file_in_their_place_are_refused(tmp_path, data_dir):
    root = checkpoint_root(tmp_path / "run")
    (root / "checkpoint-notes").mkdir(parents=True)
    (root / "checkpoint-notes" / "thesis.tex").write_text("mine")
    with pytest.raises(PeftkitError, match="not peftkit checkpoints .checkpoint-notes."):
        peftkit.train(small(tmp_path, data_dir, overwrite=True))
    assert (root / "checkpoint-notes" / "thesis.tex").read_text() == "mine"
    other = checkpoint_root(tmp_path / "other")
    other.write_text("mine")
    with pytest.raises(PeftkitError, match="is a file, and a run keeps its checkpoints there"):
        peftkit.train(small(tmp_path, data_dir, output_dir=str(tmp_path / "other")))


def test_resume_refuses_an_output_dir_of_the_users_files(tmp_path, data_dir):
    from peftkit.checkpoints import record_options
    from peftkit.resolve import make_config

    record_options(make_config(small(tmp_path, data_dir)), tmp_path / "run", "abc")
    (checkpoint_root(tmp_path / "run") / "checkpoint-4").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "README.md").write_text("mine")
    with pytest.raises(PeftkitError, match="holds no peftkit run .README.md."):
        peftkit.train(small(tmp_path, data_dir, resume=True))
