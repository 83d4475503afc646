"""Tensors built without the device they will meet: a static scan of pipeline/ and launch/ (the
benchmark runs on ranks too), and the collective helpers' devices.

On CPU every tensor lives on one device, so `torch.stack([x.sum(), torch.tensor(n)])` passes every
CPU test and crashes on CUDA (issue #14: PPO died at its step-0 evaluation). The scan finds every
call of a torch factory (`torch.tensor`, `torch.zeros`, ...) in pipeline/ or launch/ that names no
`device=`. It passes only when the call is the direct argument of a helper that moves its input to
`collectives.device()` itself, or sits in a function of ALLOWED, each with the reason it is
CPU-only.
"""

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2] / "pipeline"
LAUNCH = ROOT.parent / "launch"  # its modules are named launch/..., pipeline/'s from pipeline/
FACTORIES = {
    "tensor",
    "as_tensor",
    "scalar_tensor",
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "linspace",
    "logspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "randperm",
    "Generator",
}
# Helpers that move their argument to collectives.device() before it meets anything
# (collectives.all_reduce_sum).
MOVES_TO_DEVICE = {"all_reduce_sum"}
ALLOWED = {  # (module, function): why its factory calls never meet a device tensor
    (
        "data/collate.py",
        "pad",
    ): "collation: token ids built on CPU; callers move the batch to the device",
    (
        "stages/common.py",
        "EpochSampler._mine",
    ): "data order: a CPU generator's permutation, turned into a list",
    (
        "stages/ppo.py",
        "PPOTrainer._epochs",
    ): "mini-batch order from a CPU generator; the indices are moved to "
    "the rollout's device (`.to(exp.sequences.device)`) before use",
    ("stages/ppo_setup.py", "PromptOrder.__init__"): "prompt order: a CPU generator",
    (
        "stages/ppo_setup.py",
        "PromptOrder.take",
    ): "prompt order: a CPU generator's permutation, turned into a list",
    ("stages/ppo_setup.py", "PromptOrder.load_state_dict"): "RNG state of the CPU generator",
    (
        "stages/sft.py",
        "run.<locals>.evaluate",
    ): "CPU accumulator of Python floats (`.item()`), reduced by all_reduce_sum",
    (
        "stages/reward.py",
        "run.<locals>.evaluate",
    ): "CPU accumulator of Python floats (`.item()`), reduced by all_reduce_sum",
    (
        "launch/bench_floor.py",
        "per_rank",
    ): "benchmark figures (Python floats) summed by all_reduce_sum",
    (
        "launch/bench_floor.py",
        "_plain_iteration",
    ): "the single-process floor: mini-batch order from a CPU generator",
    (
        "launch/bench_floor.py",
        "matmul_flops",
    ): "the single-process CPU floor: the machine's CPU matmul speed, on purpose",
}


def _factory(call: ast.Call) -> str | None:
    f = call.func
    if (
        isinstance(f, ast.Attribute)
        and f.attr in FACTORIES
        and isinstance(f.value, ast.Name)
        and f.value.id == "torch"
    ):
        return f.attr
    return None


def _moves_to_device(call: ast.Call) -> bool:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return name in MOVES_TO_DEVICE


def _unplaced(tree: ast.AST, module: str) -> list[tuple]:
    """Every unplaced factory call as (module, qualname, line, source); nested functions are named
    as Python names them (`run.<locals>.evaluate`)."""
    found, exempt = [], set()

    def visit(node, scope):
        if isinstance(node, ast.Call):
            if _moves_to_device(node):
                exempt.update(id(a) for a in node.args)
            if (
                _factory(node)
                and id(node) not in exempt
                and not any(k.arg == "device" for k in node.keywords)
            ):
                found.append((module, ".".join(scope), node.lineno, ast.unparse(node)[:80]))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                visit(child, [*scope, "<locals>", child.name] if nested else [*scope, child.name])
            elif isinstance(child, ast.ClassDef):
                visit(child, [*scope, child.name])
            else:
                visit(child, scope)

    visit(tree, [])
    return found


def unplaced_factory_calls(root: Path = ROOT) -> list[tuple]:
    out = []
    for path in sorted(root.rglob("*.py")):
        module = str(path.relative_to(root))
        out += _unplaced(ast.parse(path.read_text(encoding="utf-8")), module)
    return out


def scanned() -> list[tuple]:
    """The unplaced calls of pipeline/ and of launch/ (the benchmark's modules)."""
    return unplaced_factory_calls() + [
        ("launch/" + m, *rest) for m, *rest in unplaced_factory_calls(LAUNCH)
    ]


def test_every_tensor_built_on_ranks_names_its_device():
    bad = [
        f"{m}:{line} in {fn or '<module>'}: {src}"
        for m, fn, line, src in scanned()
        if (m, fn) not in ALLOWED
    ]
    assert not bad, (
        "tensors built without device= (use x.new_tensor / device=x.device / collectives.device(), "
        "or add the function to ALLOWED with the reason it is CPU-only):\n" + "\n".join(bad)
    )


def test_the_allowlist_has_no_stale_entries():
    used = {(m, fn) for m, fn, *_ in scanned()}
    assert not set(ALLOWED) - used, (
        f"ALLOWED entries without an unplaced call: {set(ALLOWED) - used}"
    )


def test_the_scan_finds_a_scalar_stacked_without_its_device(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def f(x):\n"
        "    ok = x.new_tensor(1.0) + torch.zeros(2, device=x.device)\n"
        "    moved = collectives.all_reduce_sum(torch.tensor([1.0]))\n"
        "    return torch.stack([x.sum(), torch.tensor(float(x.numel()))])\n"
        "class C:\n"
        "    def g(self):\n"
        "        def h():\n"
        "            return torch.ones(3)\n"
        "        return h\n"
    )
    found = [(fn, line) for _, fn, line, _ in unplaced_factory_calls(tmp_path)]
    assert found == [("f", 5), ("C.g.<locals>.h", 9)]


# ---------------------------------------------------------------- the helpers' devices
def test_local_statistics_are_built_on_the_input_device():
    """On the meta device a CPU-built scalar cannot join the input: the helpers must use its
    device."""
    from pipeline.distributed import collectives

    x = torch.ones(3, 4, device="meta")
    assert collectives.mean_sums(x).device.type == "meta"
    assert collectives.whiten_sums(x, torch.ones(3, 4, device="meta")).device.type == "meta"


def test_the_ppo_math_stays_on_its_inputs_device():
    """The rollout's math (pipeline/ppo_math.py, the critic and REINFORCE++ estimators, the masks
    and positions of generation and scoring) on meta-device inputs: a non-scalar tensor built on
    the CPU inside any of them cannot join a meta tensor (as it cannot join a CUDA one), and every
    output must come back on the inputs' device. The group estimators are not here: torch.unique
    needs values, which the meta device does not have."""
    from pipeline import estimators, ppo_math
    from pipeline.generation import position_ids, response_mask
    from pipeline.models import score_index

    dev = torch.device("meta")
    B, R, V = 4, 5, 7
    ids = torch.zeros(B, 3 + R, dtype=torch.long, device=dev)
    mask = torch.ones(B, 3 + R, dtype=torch.long, device=dev)
    m = response_mask(ids[:, 3:], eos_token_id=2)
    x = torch.zeros(B, R, device=dev)
    logits = ppo_math.sampling_logits(torch.zeros(B, R, V, device=dev), 0.7, 2, 2)
    out = {
        "position_ids": position_ids(mask),
        "score_index": score_index(ids, mask, pad_token_id=0),
        "logprobs": ppo_math.logprobs_from_logits(logits, ids[:, 3:]),
        "entropy": ppo_math.entropy_from_logits(logits),
        "whiten": ppo_math.masked_whiten(x, m),
        "rewards": ppo_math.shape_rewards(x[:, 0], x, m, 0.1, 5.0, x, 0.2),
        "explained_variance": ppo_math.explained_variance(x, x, m),
        "kl_loss": ppo_math.kl_penalty_loss(x, x, m, "k3", 10.0),
        "ema": ppo_math.ema_update_(torch.zeros(3, device=dev), torch.ones(3, device=dev), 0.9),
    }
    for mode in ppo_math.LOSS_AGG_MODES:
        loss, stats = ppo_math.policy_loss(
            x, x, x, m, 0.2, x.sum(), clip_eps_high=0.3, dual_clip=3.0, agg_mode=mode, num_seqs=4.0
        )
        out.update({f"policy_loss {mode}": loss, **stats})
    loss, stats = ppo_math.value_loss(x, x, x, m, x.sum(), 0.2)
    out.update({"value_loss": loss, **stats})
    inputs = estimators.AdvantageInputs(x, m, x, x[:, 0], None, 1.0, 0.95)
    for name in ("gae", "sequence", "reinforce_pp"):
        adv, ret = estimators.estimate_advantages(name, inputs, whiten=True)
        out.update({f"{name} advantages": adv, f"{name} returns": ret})
    assert {k: t.device for k, t in out.items() if t.device != dev} == {}


@pytest.fixture(scope="module")
def one_rank():
    """A world-size-1 gloo group in this process (what init_distributed makes without a
    launcher)."""
    import torch.distributed as dist

    from pipeline.distributed import collectives

    created = not dist.is_initialized()
    d = collectives.init_distributed()
    yield d
    if created:
        dist.destroy_process_group()


def test_collective_helpers_return_on_the_engine_device(one_rank):
    from pipeline.distributed import collectives

    dev = collectives.device()
    x = torch.arange(6.0, device=dev).reshape(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], device=dev)
    summed = collectives.all_reduce_sum(x)
    assert summed.device == dev and torch.equal(summed, x)
    assert (
        collectives.all_reduce_sum(torch.tensor([1.0])).device == dev
    )  # moved there by the helper
    white = collectives.global_whiten(x, mask)
    assert white.device == dev
    assert white[mask.bool()].mean().abs() < 1e-6 and torch.all(white[~mask.bool()] == 0)
    assert collectives.global_mean(x) == pytest.approx(2.5)
    assert collectives.global_mean(torch.tensor([1.0, 2.0], dtype=torch.float64)) == pytest.approx(
        1.5
    )
    assert collectives.finite_on_every_rank(x, mask)
    assert not collectives.finite_on_every_rank(x, x / 0)  # 0 / 0 is NaN
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    assert collectives.all_gather_object(3) == [3]
