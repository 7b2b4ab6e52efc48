"""Tickets as portable files (utils/lottery/tickets.py, utils/models/ticket_file.py, utils/lottery/plain.py):
export -> show -> controls and given weights from the file, a plain state dict for the ordinary
class, tampered and wrong-model files refused.  LeNet-300-100 on digits, torch loader, short."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import pytest
import torch
import torchvision

from tests.helpers import PYTHON, ROOT, digits_config, write_config
from tests.test_resume import assert_same_results, run_in_process
from utils.lottery import plain, tickets
from utils.models import pretrained, ticket_file
from utils.models.mask_layers import apply_masks_, prepare_model, set_masks
from utils.models.registry import get_model
from utils.pruning.masks import compute_masks


def command(*args):
    """python -m utils.ticket ARGS in this process -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tickets.main(list(map(str, args)))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory, digits):
    """A finished 3-level IMP run (seed 0) and its level-2 ticket."""
    base = tmp_path_factory.mktemp("tickets")
    config = write_config(base / "s.yaml", digits_config(digits, base / "runs", "source", **{"training.epochs": 1}))
    code, _, err = run_in_process(config)
    assert code == 0, err
    root = base / "runs" / "source"
    code, out, err = command("export", "--experiment", root, "--level", 2)
    assert code == 0, err
    assert f"-> {root / 'tickets' / 'level_2.safetensors'}" in out
    return root


def ticket_of(root):
    return root / "tickets" / "level_2.safetensors"


def run_config(tmp_path, digits, name, **overrides):
    return write_config(tmp_path / f"{name}.yaml", digits_config(digits, tmp_path / "runs", name, **{
        "training.epochs": 1, **overrides}))


# ------------------------------------------------------------------------------ export, show
def test_the_file_holds_the_levels_masks_weights_and_metadata(source):
    ticket = ticket_file.read_ticket(ticket_of(source))
    assert sorted(ticket.groups) == ["init", "lineage", "masks", "trained"]  # IMP: no rewind point
    for level in range(3):
        saved = torch.load(source / "masks" / f"level_{level}.pt", weights_only=True)
        got = ticket.masks_at(level)
        assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k].bool()) for k in saved)
    assert all(torch.equal(ticket.groups["masks"][k], ticket.masks_at(2)[k]) for k in ticket.groups["masks"])
    init = torch.load(source / "checkpoints" / "init.pt", weights_only=True)["model"]
    last = torch.load(source / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert ticket.groups["init"].keys() == {k for k in init if not k.endswith(".mask")}
    assert all(torch.equal(ticket.groups["init"][k], init[k]) for k in ticket.groups["init"])
    assert all(torch.equal(ticket.groups["trained"][k], last[k]) for k in ticket.groups["trained"])
    meta = ticket.metadata
    assert meta["model"] == {"name": "lenet_300_100", "num_classes": 10, "in_channels": 1, "image_size": 8,
                             "blurpool": False, "exclude": []}
    assert meta["data"]["write_record"]["num_samples"] == 1437 and meta["config"]["experiment.seed"] == 0
    assert [row["level"] for row in meta["levels"]] == [0, 1, 2]
    assert meta["levels"][2]["final_test_acc"] == pytest.approx(
        float((source / "levels.csv").read_text().splitlines()[3].split(",")[3]))
    assert set(meta["checksums"]) == set(ticket.groups) and len(meta["commit"]) >= 7


def test_show_prints_the_metadata_and_layers_without_torch(source):
    script = ("import sys; from utils.lottery.tickets import main; code = main(['show', sys.argv[1]]); "
              "assert 'torch' not in sys.modules, 'show imported torch'; sys.exit(code)")
    result = subprocess.run([PYTHON, "-c", script, str(ticket_of(source))], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "level 2 of" in out and "checksums: OK" in out and "model: lenet_300_100 (num_classes=10" in out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()[out.splitlines().index("") + 2:]}
    rows = [line.split(",") for line in (source / "layers.csv").read_text().splitlines() if line.startswith("2,")]
    assert len(rows) == len(table) == 3
    for _, layer, numel, alive, density in rows:  # level 2's rows of layers.csv
        assert table[layer][1:] == [f"{int(numel):,}", f"{int(alive):,}", f"{float(density):.4f}"]


def test_a_level_whose_trained_weights_are_not_on_disk_is_refused_unless_left_out(source, tmp_path):
    code, _, err = command("export", "--experiment", source, "--level", 1, "--out", tmp_path / "t.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "final weights of level 1 are not on disk" in err and "--without-trained" in err
    assert not (tmp_path / "t.safetensors").exists()
    code, _, err = command("export", "--experiment", source, "--level", 1, "--out", tmp_path / "t.safetensors",
                           "--without-trained")
    assert code == 0, err
    assert sorted(ticket_file.read_ticket(tmp_path / "t.safetensors").groups) == ["init", "lineage", "masks"]
    code, _, err = command("export", "--experiment", source, "--level", 3)
    assert code == 2 and "level 3 of" in err and "is not finished" in err


# ------------------------------------------------------------------------------ a ticket file as a source
def test_a_reinit_control_from_the_file_equals_the_control_from_the_directory(tmp_path, digits, source):
    results = {}
    for name, masks_from in (("from_dir", source), ("from_file", ticket_of(source))):
        config = run_config(tmp_path, digits, name, **{"prune.masks_from": str(masks_from), "prune.control": "reinit",
                                                       "experiment.seed": 3})
        code, out, err = run_in_process(config)
        assert code == 0, err
        results[name] = tmp_path / "runs" / name
    assert_same_results(results["from_dir"], results["from_file"])
    for level in range(3):
        assert torch.equal(torch.load(results["from_file"] / "masks" / f"level_{level}.pt")["3"],
                           torch.load(source / "masks" / f"level_{level}.pt")["3"])


def test_model_weights_from_the_file_reproduce_the_sources_levels(tmp_path, digits, source):
    """A control that takes the file's masks and, by model.weights, its initial weights (seed 0:
    the source's data order) trains every level of the source again, value for value."""
    file = ticket_of(source)
    config = run_config(tmp_path, digits, "again", **{"prune.masks_from": str(file), "model.weights": str(file)})
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert f"model.weights={file}: 6 tensors" in out
    assert_same_results(source, tmp_path / "runs" / "again")

    # with a suffix: the trained weights, whatever this run's own seed would have drawn
    config = run_config(tmp_path, digits, "trained", **{"model.weights": f"{file}:trained", "experiment.seed": 4,
                                                        "prune.levels": 1})
    code, out, err = run_in_process(config)
    assert code == 0, err
    init = torch.load(tmp_path / "runs" / "trained" / "checkpoints" / "init.pt", weights_only=True)["model"]
    trained = ticket_file.read_ticket(file).groups["trained"]
    assert all(torch.equal(init[k], trained[k]) for k in trained)


def test_an_unknown_suffix_is_refused_in_one_line(tmp_path, digits, source):
    config = run_config(tmp_path, digits, "bad", **{"model.weights": f"{ticket_of(source)}:final"})
    code, _, err = run_in_process(config)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown suffix ':final'" in err and ":init, :trained, :rewind" in err
    assert not (tmp_path / "runs" / "bad").exists()


# ------------------------------------------------------------------------------ refusals
def tampered(source, tmp_path, group="trained"):
    """A copy of the ticket with one byte of a tensor of ``group`` changed in place."""
    copy = tmp_path / "tampered.safetensors"
    shutil.copy(ticket_of(source), copy)
    data = bytearray(copy.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + length]))
    name = next(k for k in sorted(header) if k.startswith(f"{group}/") and k.endswith("weight"))
    begin, _ = header[name]["data_offsets"]
    data[8 + length + begin + 1] ^= 0x40
    copy.write_bytes(bytes(data))
    return copy


def test_a_tampered_tensor_group_is_refused_by_its_checksum(tmp_path, digits, source):
    bad = tampered(source, tmp_path)
    with pytest.raises(ticket_file.TicketError, match="tensor group 'trained' does not match its checksum"):
        ticket_file.read_ticket(bad)
    code, _, err = command("show", bad)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'trained' does not match its checksum" in err
    code, _, err = command("plain", "--ticket", bad, "--out", tmp_path / "p.pt")
    assert code == 2 and not (tmp_path / "p.pt").exists()
    config = run_config(tmp_path, digits, "ctl", **{"prune.masks_from": str(tampered(source, tmp_path, "init")),
                                                    "prune.control": "reinit", "experiment.seed": 3})
    code, _, err = run_in_process(config)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'init' does not match its checksum" in err
    # the same tensors written again with the old metadata: still refused
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(ticket_of(source)), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(ticket_of(source)))
    tensors["masks/1"] = ~tensors["masks/1"]
    save_file(tensors, str(tmp_path / "rewritten.safetensors"), metadata=metadata)
    with pytest.raises(ticket_file.TicketError, match="tensor group 'masks' does not match"):
        ticket_file.read_ticket(tmp_path / "rewritten.safetensors")


def test_a_file_of_another_model_is_refused_in_one_line(tmp_path, digits, source):
    for key in ("prune.masks_from", "model.weights"):
        config = run_config(tmp_path, digits, "conv", **{"model.name": "conv2", key: str(ticket_of(source))})
        code, _, err = run_in_process(config)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert {"prune.masks_from": "was made with model.name='lenet_300_100', this run has model.name='conv2'",
                "model.weights": "does not fit model: missing"}[key] in err
    other = prepare_model(get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=12))
    with pytest.raises(pretrained.WeightsError, match=r"shapes differ: 1.weight \[300, 64\] in the file, \[300, 144\]"):
        pretrained.load_given_weights(other, str(ticket_of(source)))


def test_lineage_refuses_masks_that_grow():
    masks = [{"a": torch.tensor([True, False])}, {"a": torch.tensor([True, True])}]
    with pytest.raises(ValueError, match="layer a: level 1's mask keeps weights level 0's pruned"):
        ticket_file.lineage_of(masks)


# ------------------------------------------------------------------------------ plain
def test_plain_writes_a_state_dict_that_loads_into_the_ordinary_lenet(tmp_path, source):
    out = tmp_path / "plain.pt"
    code, printed, err = command("plain", "--experiment", source, "--level", 2, "--out", out)
    assert code == 0, err
    assert "load_state_dict(torch.load(" in printed and "strict=True" in printed
    state = torch.load(out, weights_only=True)
    model = get_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(state, strict=True)
    masks = torch.load(source / "masks" / "level_2.pt", weights_only=True)
    for name, mask in masks.items():
        assert bool((state[f"{name}.weight"][~mask] == 0).all()) and bool((state[f"{name}.weight"][mask] != 0).all())
    masked = plain.masked_model(ticket_file.read_ticket(ticket_of(source)).metadata["model"], masks,
                                ticket_file.read_ticket(ticket_of(source)).groups["trained"])
    inputs = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(inputs), masked(inputs))
    code, _, err = command("plain", "--ticket", ticket_of(source), "--out", tmp_path / "again.pt")
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert code == 0 and all(torch.equal(again[k], state[k]) for k in state)
    code, _, err = command("plain", "--experiment", source, "--level", 1, "--out", tmp_path / "one.pt")
    assert code == 2 and "not on disk" in err and not (tmp_path / "one.pt").exists()


@pytest.mark.parametrize("name,image_size", [("resnet18", 8), ("lenet5", 28)])
def test_plain_loads_strictly_into_the_ordinary_class_with_the_same_outputs(tmp_path, name, image_size):
    torch.manual_seed(0)
    args = {"name": name, "num_classes": 10, "in_channels": 1, "image_size": image_size, "exclude": []}
    model = prepare_model(get_model(name, num_classes=10, in_channels=1, image_size=image_size))
    masks = compute_masks(model, density=0.3, criterion="random", allocation="global", seed=1)
    set_masks(model, masks)
    apply_masks_(model)
    for module in model.modules():  # trained BatchNorm statistics, not the fresh ones
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    trained = {k: v for k, v in model.state_dict().items() if not k.endswith(".mask")}
    lines = plain.write_plain(tmp_path / "p.pt", args, masks, trained, what="test")
    if name == "resnet18":  # torchvision alone, as printed
        assert "    model = torchvision.models.resnet18(weights=None, num_classes=10)" in lines
        ordinary = torchvision.models.resnet18(weights=None, num_classes=10)
        ordinary.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        ordinary.maxpool = torch.nn.Identity()
    else:
        ordinary = get_model(name, num_classes=10, in_channels=1, image_size=image_size)
    ordinary.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True), strict=True)
    inputs = torch.randn(4, 1, image_size, image_size)
    with torch.no_grad():
        assert torch.equal(ordinary.eval()(inputs), model.eval()(inputs))
    assert all(bool((ordinary.get_submodule(layer).weight[~mask] == 0).all()) for layer, mask in masks.items())


def test_plain_refuses_channel_and_nm_levels_and_points_to_compact():
    channel = plain.refusal("channel", "channels", "runs/x", 2, False)
    assert "python -m utils.compact --experiment DIR --level 2 --out FILE.pt2" in channel
    assert "--format semi-structured" in plain.refusal("nm", "semi-structured", "runs/x", 1, False)
    assert "blurpool" in plain.refusal("unstructured", None, "runs/x", 1, True)
    assert plain.refusal("unstructured", None, "runs/x", 1, False) is None


def test_the_report_counts_a_ticket_controls_levels_from_the_file(source):
    from utils.report.experiments import level_count
    control = {**ticket_file.read_ticket(ticket_of(source)).config, "prune.masks_from": str(ticket_of(source)),
               "prune.control": "reinit", "experiment.seed": 3}
    assert level_count(control) == (3, None)
    assert level_count({**control, "prune.levels": 2}) == (2, None)
    one = source.parent.parent / "one.safetensors"
    assert command("export", "--experiment", source, "--level", 0, "--out", one, "--without-trained")[0] == 0
    assert level_count({**control, "prune.masks_from": str(one)}) == (1, None)


def test_a_control_from_the_file_refuses_other_data(source, digits):
    """The file carries its run's data.json: a control whose training file is other data (here
    the test file in its place) is refused in one line naming it, as one from the directory is."""
    from utils.lottery.controls import ControlError, _check_source_data
    ticket = ticket_file.read_ticket(ticket_of(source))
    recorded = json.loads((source / "data.json").read_text())
    assert ticket.metadata["run_data"] == recorded
    same = {"train": recorded["train"]["path"], "test": recorded["test"]["path"]}
    _check_source_data(ticket_of(source), ticket, same)   # its own data: accepted
    other = {"train": recorded["test"]["path"], "test": recorded["test"]["path"]}
    with pytest.raises(ControlError, match=r"was trained on other data: dataset.train_path=") as refused:
        _check_source_data(ticket_of(source), ticket, other)
    assert "\n" not in str(refused.value)
