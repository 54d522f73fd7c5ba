"""Faults of ``grades_optim.checkpoint`` (docs/RELIABILITY.md, catalogue rows 78 on).

Every refused load states its error and leaves the model, optimizer, scheduler, RNG and the
folder's files as they were; every refused save leaves the folder as it was.
"""
import copy
import dataclasses
import errno
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import grades_optim.checkpoint as ckpt
from grades_optim import GradESOptimizer
from tests.conftest import TinyLM, batch, make_model


def lambda_sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def trained_run(folder, steps=4, sched=lambda_sched, **kw):
    """A short run that saves a checkpoint of step ``steps`` into ``folder``."""
    model, opt, scheduler = _side(make_model(seed=1), sched=sched, **kw)
    for s in range(steps):
        opt.zero_grad()
        model.loss(batch(s)).backward()
        opt.step()
        if scheduler:
            scheduler.step()
    ckpt.save_checkpoint(folder, steps, model=model, optimizer=opt, scheduler=scheduler)


def files(folder):
    folder = pathlib.Path(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else None


def everything(model, opt, sched):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            None if sched is None else copy.deepcopy(sched.state_dict()), torch.get_rng_state(),
            [p.requires_grad for p in model.parameters()])


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert repr(a[1]) == repr(b[1])
    assert a[2] == b[2] and torch.equal(a[3], b[3]) and a[4] == b[4]


class Wider(TinyLM):
    """The same parameter names and shapes as TinyLM: only the class tells them apart."""


# (id, how the loading side is built: model, optimizer, scheduler; error regex)
LOAD_CASES = [
    ("another_model_class", lambda: _side(Wider()), r"its model is a TinyLM, this one a Wider"),
    ("another_model_shape", lambda: _side(make_model(d=16)),
     r"its model has other parameters: model\.embed_tokens\.weight is \(32, 8\) there, \(32, 16\) here"),
    ("another_inner_optimizer", lambda: _side(make_model(), inner=torch.optim.SGD),
     r"its optimizer is a GradESOptimizer\(AdamW\), this one a GradESOptimizer\(SGD\)"),
    ("plain_optimizer_for_a_wrapper_checkpoint", lambda: _side(make_model(), plain=True),
     r"its optimizer is a GradESOptimizer\(AdamW\), this one a AdamW"),
    ("another_scheduler_class",
     lambda: _side(make_model(), sched=lambda o: torch.optim.lr_scheduler.StepLR(o, 2)),
     r"its scheduler is a LambdaLR, this one a StepLR"),
    ("other_rule_settings", lambda: _side(make_model(), metric="grad_l2"),
     r"its optimizer state does not fit: state_dict was saved with other GradES rule settings "
     r"\(metric='grad_l1' there, 'grad_l2' here"),
]


def _side(model, inner=torch.optim.AdamW, plain=False, sched=lambda_sched, **kw):
    opt = inner(model.parameters(), lr=1e-2)
    if not plain:
        opt = GradESOptimizer(opt, model=model, **dict(dict(tau=1e-9, grace_steps=2), **kw))
    return model, opt, sched(opt) if sched else None


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_refused_loads_modify_nothing(case, tmp_path):
    _, build, message = case
    trained_run(tmp_path, metric="grad_l1")
    model, opt, sched = build()
    before, on_disk = everything(model, opt, sched), files(tmp_path)
    with pytest.raises(ValueError, match=r"Checkpoint .*ckpt-000000004\.pt does not fit: " + message):
        ckpt.load_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched)
    assert_same_state(everything(model, opt, sched), before)
    assert files(tmp_path) == on_disk


def test_a_scheduler_given_where_none_was_saved_is_refused(tmp_path):
    trained_run(tmp_path, sched=None)
    model, opt, sched = _side(make_model())
    before = everything(model, opt, sched)
    with pytest.raises(ValueError, match=r"it holds no scheduler state, yet scheduler= was given"):
        ckpt.load_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched)
    assert_same_state(everything(model, opt, sched), before)


def test_a_saved_scheduler_not_asked_for_loads_the_rest_with_a_warning(tmp_path, caplog):
    trained_run(tmp_path)
    model, opt, _ = _side(make_model())
    with caplog.at_level("WARNING", logger="grades_optim"):
        state = ckpt.load_checkpoint(tmp_path, model=model, optimizer=opt, restore_rng=False)
    assert state["step"] == 4 and opt.step_count == 4
    assert "holds a scheduler state; no scheduler= was given" in caplog.text


@pytest.mark.parametrize("call", ["load", "save", "list"])
def test_a_file_instead_of_a_folder_is_refused(call, tmp_path):
    trained_run(tmp_path / "run")
    path = ckpt.list_checkpoints(tmp_path / "run")[0]  # the checkpoint file itself
    model, opt, sched = _side(make_model())
    before, on_disk = everything(model, opt, sched), files(tmp_path / "run")
    with pytest.raises(ValueError, match=r"Invalid directory: '.*ckpt-000000004\.pt' is a file, not a checkpoint "
                                         r"folder .*; pass the folder"):
        if call == "load":
            ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
        elif call == "save":
            ckpt.save_checkpoint(path, 8, model=model, optimizer=opt, scheduler=sched)
        else:
            ckpt.list_checkpoints(path)
    assert_same_state(everything(model, opt, sched), before)
    assert files(tmp_path / "run") == on_disk


def test_another_runs_later_checkpoint_is_refused_at_save(tmp_path):
    trained_run(tmp_path, steps=6)  # an older run that got further
    model, opt, sched = _side(make_model())
    on_disk = files(tmp_path)
    with pytest.raises(ValueError, match=r"Invalid step: 2 is older than ckpt-000000006\.pt already in .*another "
                                         r"run's checkpoint .* Resume from it with load_checkpoint, or use another"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    assert files(tmp_path) == on_disk  # nothing written, nothing rotated away


def test_a_torn_later_checkpoint_gives_way_to_the_step_written_now(tmp_path):
    trained_run(tmp_path, steps=6)
    path = tmp_path / "ckpt-000000006.pt"
    path.write_bytes(path.read_bytes()[:100])  # torn: never loadable
    model, opt, sched = _side(make_model())
    ckpt.save_checkpoint(tmp_path, 5, model=model, optimizer=opt, scheduler=sched)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000005.pt"]


def test_step_numbers_past_nine_digits_sort_and_rotate(tmp_path):
    model, opt, sched = _side(make_model())
    for step in (999_999_998, 999_999_999, 1_000_000_000, 12_345_678_901):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-12345678901.pt", "ckpt-1000000000.pt"]
    assert ckpt.load_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched)["step"] == 12_345_678_901


@dataclasses.dataclass
class Opaque:
    x: int = 1


@pytest.mark.parametrize("value, shown", [(Opaque(), "Opaque"), ({"deep": [1, pathlib.Path("a")]}, "PosixPath"),
                                          (lambda: 0, "function")])
def test_extra_values_that_would_not_load_back_are_refused_at_save(value, shown, tmp_path):
    model, opt, sched = _side(make_model())
    with pytest.raises(ValueError, match=rf"Invalid extra\['bad'\]: it holds a {shown}, which "
                                         r"torch\.load\(weights_only=True\) refuses"):
        ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, extra={"ok": 1, "bad": value})
    assert not tmp_path.exists() or files(tmp_path) == {}
    with pytest.raises(TypeError, match=r"Invalid extra: expected a dict, got list"):
        ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, extra=[1])


def test_extra_values_that_load_back_are_kept(tmp_path):
    model, opt, sched = _side(make_model())
    extra = {"n": 3, "t": torch.ones(2), "nested": {"a": [1.5, "s", None, (2, 3)], "b": torch.float32}}
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, extra=extra)
    got = ckpt.load_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched)["extra"]
    assert got["n"] == 3 and torch.equal(got["t"], extra["t"]) and got["nested"] == extra["nested"]


def test_a_full_disk_leaves_no_temporary_file_and_the_previous_checkpoints(tmp_path, monkeypatch):
    trained_run(tmp_path)
    on_disk = files(tmp_path)
    model, opt, sched = _side(make_model())

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.save_checkpoint(tmp_path, 8, model=model, optimizer=opt, scheduler=sched)
    assert files(tmp_path) == on_disk


def test_a_live_writers_temporary_file_is_left_alone_and_a_dead_ones_removed(tmp_path):
    trained_run(tmp_path)
    final = tmp_path / "ckpt-000000009.pt"
    live = ckpt.temp_name(final)  # this process: another thread's write in flight
    live.write_bytes(b"half")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = ckpt.temp_name(final, pid=int(dead.stdout))  # a writer killed mid-write
    dead.write_bytes(b"half")
    assert live.name != ckpt.temp_name(final).name  # two writes never share a temporary file
    model, opt, sched = _side(make_model())
    ckpt.save_checkpoint(tmp_path, 8, model=model, optimizer=opt, scheduler=sched)
    assert live.exists() and not dead.exists()
    live.unlink()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000008.pt", "ckpt-000000004.pt"]


@pytest.mark.parametrize("step, message", [(True, r"Invalid step: True"), (-1, r"Invalid step: -1"),
                                           (2.0, r"Invalid step: 2\.0")])
def test_invalid_steps_are_refused(step, message, tmp_path):
    model, opt, _ = _side(make_model())
    with pytest.raises(ValueError, match=message):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt)
    assert not tmp_path.exists() or files(tmp_path) == {}
