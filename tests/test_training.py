"""End-to-end training on scikit-learn's digits: loss falls, backends agree, resume, DDP."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from spatialformer import train as digits
from spatialformer_kernels import available_backends

# Triton's interpreter needs minutes for a training step; on CPU the C++ kernel stands in.
TRAINING_BACKENDS = [b for b in available_backends() if b == "cpu" or (b == "triton" and torch.cuda.is_available())]


def test_loss_falls_on_digits():
    result = digits.train(steps=25, batch_size=64, backend="auto", progress=False)
    losses = [loss for _, loss, _ in result["history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert result["test_accuracy"] > 0.3  # ten classes: chance is 0.1


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_kernel_backend_follows_the_reference_loss_curve(backend):
    reference = digits.train(steps=3, batch_size=8, backend="reference", progress=False)["history"]
    kernel = digits.train(steps=3, batch_size=8, backend=backend, progress=False)["history"]
    for (_, loss_ref, _), (_, loss_kernel, _) in zip(reference, kernel, strict=True):
        assert loss_kernel == pytest.approx(loss_ref, rel=1e-4, abs=1e-5)


def test_resume_continues_exactly(tmp_path):
    straight = digits.train(steps=4, batch_size=16, out=tmp_path / "a", checkpoint_every=2, progress=False)
    first = digits.train(steps=2, batch_size=16, out=tmp_path / "b", progress=False)
    resumed = digits.train(steps=4, batch_size=16, out=tmp_path / "b", resume=True, progress=False)
    assert [h[0] for h in resumed["history"]] == [2, 3]
    assert first["history"] + resumed["history"] == straight["history"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "checkpoint.safetensors"), load_file(tmp_path / "b" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_ports(count: int) -> list[int]:
    """Distinct ports free right now (the sockets stay open until all are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ddp_worker(rank, ports, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    # First the gradients of one DDP step on this rank's half of a global batch.
    torch.distributed.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(digits.make_model("auto"))
    images, labels, _, _ = digits.load_digits_split()
    index = digits.batch_indices(0, 16, len(labels), seed=0)[rank::2]
    torch.nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
    grads = {n: p.grad for n, p in model.module.named_parameters()}
    torch.distributed.barrier()  # both ranks are done with this group's store before it goes
    torch.distributed.destroy_process_group()
    # Then the training command itself, which initialises its own process group, on a store
    # of its own (re-binding the first port raced with the old store's teardown and hung).
    os.environ["MASTER_PORT"] = str(ports[1])
    result = digits.train(steps=3, batch_size=16, backend="auto", progress=False)
    torch.save({"grads": grads, "history": result["history"]}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    ports = _free_ports(2)
    mp.spawn(_ddp_worker, args=(ports, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = digits.make_model("auto")
    images, labels, _, _ = digits.load_digits_split()
    index = digits.batch_indices(0, 16, len(labels), seed=0)
    torch.nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
    for name, param in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=1e-4, atol=1e-6)

    single = digits.train(steps=3, batch_size=16, backend="auto", progress=False)["history"]
    assert ranks[0]["history"] == ranks[1]["history"]
    for (_, loss_ddp, acc_ddp), (_, loss_one, acc_one) in zip(ranks[0]["history"], single, strict=True):
        assert loss_ddp == pytest.approx(loss_one, rel=1e-4) and acc_ddp == acc_one


def test_train_dependencies_come_with_the_train_extra():
    """Every third-party module the trainer imports is a plain requirement of the package or
    one of its `train` extra, so the README's `pip install ".[train]"` is enough to train."""
    import ast
    import importlib.metadata
    import re
    import sys

    requirements = importlib.metadata.requires("spatialformer-kernels")
    declared = {
        re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-")
        for r in requirements
        if "extra" not in r or re.search(r"""extra\s*==\s*["']train["']""", r)
    }
    tree = ast.parse(open(digits.__file__).read())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    third_party = modules - set(sys.stdlib_module_names) - {"spatialformer"}
    assert {"sklearn", "safetensors", "torch", "tqdm"} <= third_party, third_party
    owners = importlib.metadata.packages_distributions()
    for module in third_party:
        assert {d.lower().replace("_", "-") for d in owners[module]} & declared, (module, owners[module], declared)


def test_missing_scikit_learn_names_the_train_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"spatialformer-kernels\[train\]"):
        digits.load_digits_split()
