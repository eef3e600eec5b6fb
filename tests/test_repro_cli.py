"""Specifications of the reproduction's command line: presets, flags, errors in one line, ablations."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from repro_helpers import TINY_ARGS, cli

from cekd_repro.config import RunConfig


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "cub", "--data-root", "no/such/dir"], "cub: no/such/dir not found; expected layout"),
        (["--dataset", "aircraft"], "--dataset aircraft needs --data-root"),
        (["--pretrained", "missing.pth"], "--pretrained missing.pth: no such file"),
        (["--arch", "resnet18,resnet18,resnet18"], "--arch gives 3 architectures for 2 members"),
        (["--resume", "nothing-here"], "--resume nothing-here: no run there (no config.json)"),
        (["--pretrained", "garbage.pth"], "--pretrained garbage.pth: not a PyTorch state-dict file"),
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
        (["--clip-grad", "0"], "--clip-grad must be > 0, got 0.0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "64"], "--batch-size 64 is larger than this rank's 16 training images"),
        (["--image-size", "0"], "--image-size must be >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--mix-p", "1.5"], "--mix-p must be in [0, 1], got 1.5"),
        (["--device", "banana"], "--device must be a torch device such as cpu, cuda or cuda:1, got 'banana'"),
        (["--ablation", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--milestones", "5"], "--milestones applies to the multistep schedule of --preset paper and transfer"),
        (["--preset", "transfer", "--milestones", "5", "3"], "--milestones must be increasing epochs >= 1, got 5 3"),
        (["--preset", "transfer", "--milestones", "0"], "--milestones must be increasing epochs >= 1, got 0"),
        (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
        (["--data-seed", "-1"], "--data-seed must be >= 0, got -1"),
        (["--dataset", "cub", "--data-root", ".", "--data-seed", "1"], "--data-seed draws the synthetic sets' images"),
        (["--sweep", "30"], "--sweep plans the schedule sweep of a new --transfer"),
        (["--transfer", "--sweep", "30", "--seeds", "2"], "--sweep gives each length its seeds (EPOCHS:SEEDS)"),
        (["--transfer", "--sweep", "30x2"], "--sweep takes EPOCHS or EPOCHS:SEEDS, got '30x2'"),
        (["--transfer", "--sweep", "30:0"], "--sweep 30:0: epochs and seeds must be >= 1"),
        (["--transfer", "--sweep", "30", "30:2"], "--sweep names a length twice: 30 30:2"),
        (["--method", "mixup", "--branches-from", "layer3"], "--branches-from applies to --method cekd, dml, one"),
        (["--method", "dml", "--members", "1"], "--members must be >= 2 for --method dml, got 1"),
        (["--method", "pcl", "--branches-from", "layer9"], "--branches-from layer9: the stage must name a child"),
        (["--compare", "--mix", "none"], "--compare sets each method without mixing beside it over --mix"),
        (["--compare", "--ablation"], "--compare is a table of its own"),
        (["--transfer", "--compare", "--sweep", "30"], "--compare is a table of its own"),
        (["--method", "kd"], "--method kd distils a finished run: give --teacher RUN_DIR"),
        (["--max-shift", "-1"], "--max-shift must be in [0, --image-size 32), got -1"),
        (["--max-shift", "32"], "--max-shift must be in [0, --image-size 32), got 32"),
        (["--method", "cutmix", "--teacher", "."], "--teacher applies to --method kd, ccd (and --compare), not cutmix"),
        (["--method", "ccd", "--teacher", "nowhere"], "error: --teacher nowhere: no run there (no config.json)"),
    ],
)
def test_cli_errors(args, message, tmp_path, monkeypatch):
    """Each bad flag ends the CLI with one line naming it (in-process: the same main() as the script)."""
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        cli_module.main([*TINY_ARGS, *args])
    text = str(exit_.value.code)
    assert message in text and "\n" not in text and text.startswith(("error: ", "--"))


@pytest.mark.parametrize(("table", "where"), [("--ablation", "empty"), ("--transfer", "empty/finetune")])
def test_resuming_a_table_where_there_is_none_is_one_line(table, where, tmp_path, monkeypatch):
    """--resume of a dir that holds no ablation plan names the dir and the missing file, for the ablation and
    for the transfer table (both read the plan through one function)."""
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli_module.main([table, "--resume", "empty"])
    assert str(exit_.value.code) == f"error: --resume {where}: no ablation there (no ablation.json)"


def one_line_exit(argv: list[str]) -> str:
    """The message ``main(argv)`` exits with: what the script prints as its last line, exit status 1, with no
    traceback (``sys.exit`` of a string)."""
    import reproduce_cekd as cli_module

    with pytest.raises(SystemExit) as exit_:
        cli_module.main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "error: --device cuda: no CUDA GPU is visible here" in one_line_exit([*TINY_ARGS, "--device", "cuda"])


def test_a_bad_model_flag_fails_before_the_run_announces_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loud = [arg for arg in TINY_ARGS if arg != "--quiet"]
    for flags, message in (
        (["--arch", "nosuchnet"], "error: unknown torchvision classification model 'nosuchnet' in --arch"),
        (["--method", "pcl", "--branches-from", "layer9"], "error: --branches-from layer9: the stage must name"),
    ):
        assert one_line_exit([*loud, *flags]).startswith(message)
        assert capsys.readouterr().out == "" and not list(tmp_path.iterdir())  # no header, no run dir


def test_cli_prints_a_line_per_epoch_and_where_the_results_are(tmp_path):
    """Read as a log file (stdout is a pipe): one line per epoch, the table, then the run dir alone on the last line."""
    args = [a for a in TINY_ARGS if a != "--quiet"]
    result = cli(*args, "--epochs", "2", "--run-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    assert all("top-1 member0" in line and "ensemble" in line and "img/s" in line for line in epochs)
    assert lines[-1].startswith("results in out (") and len(result.stdout) < 1500


def test_cli_resume_refuses_flags_it_would_ignore(tmp_path, monkeypatch):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    cli_module.main([*TINY_ARGS, "--run-dir", "run"])
    for args, message in (
        (["--lr", "0.5"], "cannot change --lr"),
        (["--run-dir", "x"], "cannot take --run-dir"),
        (["--epochs", "3"], "extends them with the multistep schedule only"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli_module.main(["--resume", "run", *args])
        assert message in str(exit_.value.code)


def test_cli_ablation_resumes_from_its_saved_plan(tmp_path, monkeypatch):
    import reproduce_cekd as cli_module

    from cekd_repro import ablation

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ablation, "ABLATION", ablation.ABLATION[:2])  # baseline and cutmix
    real_train, calls = ablation.train, []

    def dies_on_the_second_run(config, run_dir, resume=False):
        calls.append((config.method, resume))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(config, run_dir, resume)

    monkeypatch.setattr(ablation, "train", dies_on_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        cli_module.main([*TINY_ARGS, "--ablation", "--seeds", "1", "--run-dir", "abl"])
    monkeypatch.setattr(ablation, "train", real_train)
    with pytest.raises(SystemExit, match="already holds an ablation"):
        cli_module.main([*TINY_ARGS, "--ablation", "--seeds", "1", "--run-dir", "abl"])
    with pytest.raises(SystemExit, match="holds a table: add --ablation"):
        cli_module.main(["--resume", "abl"])
    assert cli_module.main(["--resume", "abl", "--ablation", "--quiet"]) == 0
    assert calls == [("baseline", False), ("cutmix", False)]
    assert "| cutmix |" in (tmp_path / "abl" / "results.md").read_text()


def test_cli_trains_a_token_model_beside_a_cnn(tmp_path, monkeypatch, capsys):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    assert (
        cli_module.main(
            [*TINY_ARGS, "--arch", "resnet18,timm:vit_tiny_patch16_224", "--mix", "snapmix", "--run-dir", "run"]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1].startswith("results in run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["arch"] == "resnet18,timm:vit_tiny_patch16_224"


def test_cli_paper_preset_without_pretrained_warns(tmp_path, monkeypatch, capsys):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    for pretrained in ([], ["--pretrained", "w.pth"]):
        with pytest.raises(SystemExit):  # stops at the missing dataset, after the warning
            cli_module.main(["--preset", "paper", "--dataset", "cub", "--data-root", "nowhere", *pretrained])
        warned = "warning: --preset paper is the fine-tuning recipe" in capsys.readouterr().err
        assert warned == (not pretrained)


def test_cli_help_shows_each_presets_defaults(capsys, monkeypatch):
    import reproduce_cekd as cli_module

    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapped at the hyphen of a preset's name
    with pytest.raises(SystemExit):
        cli_module.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    lr = "[quick: 0.1; quick-resnet18: 0.1; paper: 0.001; transfer: 0.001; transfer-tiny: 0.001; transfer-room: 0.001]"
    assert lr in text
    assert (
        "[quick: 5; quick-resnet18: 5; paper: -; transfer: -; transfer-tiny: -; transfer-room: -]" in text
    )  # --clip-grad
    archs = "quick: timm:test_resnet; quick-resnet18: resnet18; paper: resnet50; transfer: resnet18; transfer-tiny"
    assert f"[{archs}: timm:test_resnet; transfer-room: resnet18]" in text
    assert "[default: 3]" in text
    mix_alpha = "5 snapmix, 3 cutmix, 1 mixup"
    assert f"paper: {mix_alpha}; transfer: {mix_alpha}; transfer-tiny: {mix_alpha}; transfer-room: {mix_alpha}" in text
    milestones = (
        "[quick: -; quick-resnet18: -; paper: 80 150 180; transfer: 12 22 27; transfer-tiny: 12 22 27; "
        "transfer-room: 36 68 81]"
    )
    assert milestones in text


def test_cli_bad_choice(capsys):
    import reproduce_cekd as cli_module

    with pytest.raises(SystemExit) as exit_:
        cli_module.main(["--method", "mixcut"])
    assert exit_.value.code == 2 and "invalid choice: 'mixcut'" in capsys.readouterr().err


def test_cli_ablation_writes_results(tmp_path, monkeypatch, capsys):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    assert cli_module.main([*TINY_ARGS, "--ablation", "--seeds", "1", "--run-dir", "abl"]) == 0
    stdout = capsys.readouterr().out
    for mix in ("cutmix", "snapmix"):  # CEKD over both mixings, with both module switches
        for name in (mix, f"cekd+{mix} w/o cross", f"cekd+{mix} w/o ensemble", f"cekd+{mix}"):
            assert f"| {name} |" in stdout
    assert "| baseline |" in stdout and stdout.splitlines()[-1].startswith("results in abl")
    out = tmp_path / "abl"
    assert (out / "results.csv").read_text().startswith("method,seed,model,top1")
    assert "| cekd+snapmix |" in (out / "results.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_and_explicit_arguments():
    import reproduce_cekd as cli_module

    def config(*args):
        return cli_module.build_config(cli_module.parse(list(args)))

    quick = config()
    assert (quick.method, quick.dataset, quick.arch, quick.image_size) == ("cekd", "synthetic", "timm:test_resnet", 64)
    assert (quick.train_per_class, quick.epochs, quick.mix) == (30, 30, "cutmix")
    before = config("--preset", "quick-resnet18")  # the quick preset of the tables measured until 82cf9f1
    assert (before.arch, before.train_per_class, before.epochs, before.clip_grad) == ("resnet18", 60, 20, 5.0)
    assert (quick.lr, quick.clip_grad) == (0.1, 5.0) and config("--clip-grad", "2").clip_grad == 2.0
    assert config("--preset", "paper", "--dataset", "cub", "--data-root", "x").clip_grad is None
    paper = config("--preset", "paper", "--dataset", "cub", "--data-root", "x", "--mix", "snapmix")
    assert (paper.arch, paper.resize, paper.image_size, paper.batch_size, paper.epochs) == (
        "resnet50",
        512,
        448,
        16,
        200,
    )
    assert (paper.lr, paper.head_lr, paper.weight_decay, paper.milestones) == (0.001, 0.01, 1e-4, [80, 150, 180])
    assert (paper.with_mixing_alpha().mix_alpha, paper.mix_p, paper.same_on_batch) == (5.0, 1.0, True)
    cutmix = config("--preset", "paper", "--dataset", "cub", "--data-root", "x", "--method", "cutmix")
    assert paper.mix_alpha is None and cutmix.with_mixing_alpha().mix_alpha == 3.0  # each mixing its own
    assert config("--preset", "paper", "--dataset", "cub", "--data-root", "x", "--mix-alpha", "2").mix_alpha == 2.0
    assert config("--epochs", "3", "--no-cross").epochs == 3 and config("--no-cross").no_cross
    transfer = config("--preset", "transfer", "--mix", "snapmix")  # the paper's recipe on the synthetic target
    assert (transfer.dataset, transfer.train_per_class, transfer.epochs, transfer.milestones) == (
        "synthetic",
        20,
        30,
        [12, 22, 27],
    )
    assert (transfer.lr, transfer.head_lr, transfer.mix_p) == (0.001, 0.01, 1.0)
    assert transfer.with_mixing_alpha().mix_alpha == 5.0 and quick.with_mixing_alpha().mix_alpha == 1.0
    longer = config("--preset", "transfer", "--epochs", "90", "--milestones", "36", "67", "81")
    assert (longer.epochs, longer.milestones) == (90, [36, 67, 81])


def test_cli_divergence_is_one_line_and_a_failure(tmp_path, monkeypatch):
    """The issue's command: it used to print nan losses, exit 0 and overwrite the checkpoint with NaN weights."""
    monkeypatch.chdir(tmp_path)
    args = ["--lr", "1e5", "--epochs", "3", "--classes", "4", "--train-per-class", "8", "--test-per-class", "4"]
    error = one_line_exit([*args, "--image-size", "32", "--batch-size", "8", "--run-dir", "run"])
    assert re.match(r"error: epoch \d diverged: .* went non-finite", error)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if checkpoint.exists():  # whatever epoch diverged, what was kept is finite
        state = torch.load(checkpoint, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_cli_compare_writes_every_online_method_with_and_without_mixing(tmp_path, monkeypatch):
    import reproduce_cekd as cli_module

    from cekd_repro import ablation

    monkeypatch.chdir(tmp_path)
    args = [*TINY_ARGS, "--arch", "timm:test_resnet", "--compare", "--mix", "mixup", "--branches-from", "layer3"]
    assert cli_module.main([*args, "--seeds", "1", "--run-dir", "cmp"]) == 0
    rows = ["baseline", "mixup"] + [name for m in ablation.COMPARED for name in (m, f"{m}+mixup")]
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[4:]] == rows
    assert "| method | member0 | member1 | ensemble | mean0 | mean1 |" in table  # PCL's mean models
    saved = {path.parent.name: json.loads(path.read_text()) for path in (tmp_path / "cmp").glob("*/config.json")}
    assert saved["one-mixup-seed0"]["branches_from"] == saved["cekd-seed0"]["branches_from"] == "layer3"
    assert "branches_from" not in saved["baseline-seed0"] and "branches_from" not in saved["mixup-seed0"]
    assert saved["pcl-seed0"]["mix"] == "none" and saved["pcl-mixup-seed0"]["mix"] == "mixup"
    trained = []
    monkeypatch.setattr(ablation, "train", lambda *a, **k: trained.append(a))
    assert cli_module.main(["--resume", "cmp", "--compare"]) == 0 and trained == []  # all finished: kept


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mix": "cutmix,cutmix"}, "a list of distinct ones"),
        ({"mix": "cutmix,none"}, "a list of distinct ones"),
        ({"mix": "cutmix", "switch_prob": 0.5}, "--switch-prob chooses within a --mix list"),
        ({"mix": "mixup,cutmix", "switch_prob": 1.5}, r"--switch-prob must be in \[0, 1\]"),
        ({"mix_off_epoch": 0}, r"--mix-off-epoch must be in \[1, --epochs 30\)"),
        ({"mix_off_epoch": 30}, r"--mix-off-epoch must be in \[1, --epochs 30\)"),
        ({"method": "baseline", "mix_off_epoch": 3}, "--method baseline here does not mix"),
    ],
)
def test_mix_list_and_off_epoch_flags_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        replace(RunConfig(), **overrides).validate()


def test_a_mix_list_takes_each_mixings_own_alpha_and_timms_switch():
    config = replace(RunConfig(), mix="mixup,cutmix,snapmix", mix_alpha=None, switch_prob=0.4)
    assert config.mixer_methods == ("mixup", "cutmix", "snapmix") and config.mixer_alpha == [1.0, 3.0, 5.0]
    assert config.method_p == pytest.approx([0.6, 0.2, 0.2]) and config.with_mixing_alpha().mix_alpha is None
    assert replace(config, switch_prob=None).method_p is None  # equal shares
    assert {"switch_prob", "mix_off_epoch"} <= set(config.saved()) and "switch_prob" not in RunConfig().saved()


def test_dml_does_not_ramp_and_pcls_means_keep_their_own_statistics_but_old_runs_resume_as_they_trained(tmp_path):
    """DML's paper: no ramp; PCL's code: mean models with statistics of their own. A run saved before either
    (its config.json: DML with rampup_epochs, PCL without mean_buffers) resumes as it trained."""
    from cekd_repro import rundir
    from cekd_repro.run import _criterion

    dml = replace(RunConfig(), method="dml")
    assert "rampup_epochs" not in dml.saved() and _criterion(dml, 10).rampup_steps == 0
    assert _criterion(replace(dml, method="ffl"), 10).rampup_steps == 50
    pcl = replace(RunConfig(), method="pcl")
    assert pcl.saved()["mean_buffers"] == "own" and "pcl_legacy" not in pcl.saved()
    for method, saved, expected in (
        ("dml", {"rampup_epochs": 5}, {"dml_ramp": True}),
        ("pcl", {}, {"mean_buffers": "copied", "pcl_legacy": True}),
        ("dml", {}, {"dml_ramp": False}),
    ):
        run_dir = tmp_path / f"{method}-{len(saved)}"
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps({"method": method, **saved}))
        resumed = rundir.resumed_config(run_dir)
        assert {name: getattr(resumed, name) for name in expected} == expected
    old_dml = rundir.resumed_config(tmp_path / "dml-1")
    assert _criterion(old_dml, 10).rampup_steps == 50 and old_dml.saved()["dml_ramp"] is True
