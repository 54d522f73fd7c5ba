"""Shared fixtures: a tiny Llama-shaped model built by hand (no transformers needed).

Triton kernels run on CPU tensors under the interpreter: the variable must be set before triton is
first imported (it decides interpreted-or-compiled at decoration time), so it is set here, before
any test module loads. The GPU subprocess in test_kernels.py opts out with
GRADES_KERNELS_COMPILED=1.
"""
import os

if os.environ.get("GRADES_KERNELS_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import pytest  # noqa: E402
from torch import nn  # noqa: E402


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=True)  # Qwen2-style q bias: biases follow their matrix
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.o_proj(a @ self.v_proj(x))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj = nn.Linear(d, 2 * d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = Attention(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """Names follow HF Llama (``model.layers.N.self_attn.q_proj``) so default discovery applies."""

    def __init__(self, vocab=32, d=8, n_layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded CI machine the OpenMP workers
    spin-wait and make tests several times slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model():
    return make_model()


def pause_mid_write(path, data: bytes, sleep_s: float) -> None:
    """Write half of ``data`` to the temporary file ``grades_optim.checkpoint`` uses for ``path``,
    print ``WRITING`` and sleep: the crash tests SIGKILL the writer there, halfway through a write."""
    import time

    from grades_optim.checkpoint import temp_name

    with open(temp_name(path), "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    print("WRITING", flush=True)
    time.sleep(sleep_s)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant's process group.

    torchrun starts each rank in a session of its own (``start_new_session=True``), so killing
    torchrun's group alone would leave the ranks running. Descendants are collected before
    anything is killed: an orphan is reparented to init and could no longer be found.
    """
    import signal
    from pathlib import Path

    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        for kill in (os.killpg, os.kill):
            try:
                kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def run_isolated(cmd, limit_s, what, kill_when=None, **env):
    """Run ``cmd`` (from the repo root, the repo importable) in its own session with a hard time
    limit; it and every process it started (torchrun's ranks run in sessions of their own) are
    killed on the way out, so no process outlives the test. ``kill_when``: a predicate polled
    every 0.1 s; once true the whole tree gets SIGKILL (a crash at a chosen point). Returns
    ``(returncode, combined output)``."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", **env)
    proc = subprocess.Popen([sys.executable, *cmd], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + limit_s
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                log, _ = proc.communicate(timeout=max(0.0, min(left, 0.1) if kill_when else left))
                break
            except subprocess.TimeoutExpired:
                if kill_when is not None and kill_when():
                    _kill_tree(proc.pid)
                    log, _ = proc.communicate()
                    break
                if time.monotonic() >= deadline:
                    _kill_tree(proc.pid)
                    log, _ = proc.communicate()
                    pytest.fail(f"{what} exceeded {limit_s}s:\n{log[-3000:]}")
    finally:
        _kill_tree(proc.pid)
    return proc.returncode, log


def batch(seed, vocab=32, n=4, t=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)
