"""End-to-end tests of the ``tensafe train`` loop on a tiny model (fast, CPU)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from _run_helpers import isolated_deployment
from _run_helpers import write_run as _write_run

from tensafe.cli.main import main
from tensafe.crypto.signing import HybridSigningKey
from tensafe.privacy import BudgetExceededError, DpCertificate, compute_epsilon
from tensafe.training.config import load_config
from tensafe.training.errors import TrainingConfigError
from tensafe.training.synth import synthesize_dataset
from tensafe.training.trainer import BudgetStopError, train


@pytest.fixture(autouse=True)
def _deployment(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test has its own deployment database and development KEK (the CLI signs with them)."""
    isolated_deployment(monkeypatch, tmp_path / "deployment")


@pytest.fixture(scope="module")
def signer() -> HybridSigningKey:
    """A deployment-style signing key for runs that call :func:`train` directly."""
    return HybridSigningKey.generate()


class _Crash(Exception):
    pass


def test_dp_training_writes_adapter_certificate_and_metrics(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, signer: HybridSigningKey
) -> None:
    cfg = load_config(_write_run(tmp_path, tiny_model_dir))
    result = train(cfg, signer=signer, show_progress=False)
    adapter = result.adapter_dir
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    cert = DpCertificate.read(adapter / "dp_certificate.json")
    assert cert.dp_enabled and cert.steps == 6 and cert.dataset_size == 200
    assert cert.sampling_method == "poisson" and cert.sampled_by == "engine"
    assert cert.amplification == "poisson_subsampling" and cert.dataset_size_source == "counted"
    # The certificate's ε is the accountant's, for the steps actually taken, and within target.
    expected = compute_epsilon(
        accountant="rdp", noise_multiplier=cert.noise_multiplier, sample_rate=20 / 200, steps=6, delta=1e-5
    )
    assert cert.epsilon == pytest.approx(expected, rel=1e-9)
    assert cert.epsilon <= 8.0
    evidence = json.loads((adapter / "evidence.json").read_text())
    assert evidence["config_sha256"] == cfg.config_hash() and evidence["dataset_size"] == 200
    assert evidence["schema"] == "tensafe.evidence/v2" and evidence["private"] is True
    # Both copies of the certificate carry the signature of the run's signer.
    assert result.signed_by == signer.key_id
    for path in (adapter / "dp_certificate.json", result.output_dir / "dp_certificate.json"):
        assert DpCertificate.read(path).verify_signature(signer.verifying_key()) == signer.key_id
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(6))
    assert lines[-1]["epsilon"] == pytest.approx(cert.epsilon)
    assert result.plot_path is not None and result.plot_path.stat().st_size > 0


def test_resume_neither_loses_nor_repeats_a_step(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, signer: HybridSigningKey
) -> None:
    cfg = load_config(_write_run(tmp_path, tiny_model_dir))

    def crash_after_step_3(step: int, record: dict[str, Any]) -> None:
        if step == 2:  # steps 0, 1, 2 done; checkpoint exists at step 2 only
            raise _Crash

    with pytest.raises(_Crash):
        train(cfg, signer=signer, show_progress=False, on_step=crash_after_step_3)
    assert not (cfg.output_dir / "adapter").exists()
    result = train(cfg, signer=signer, show_progress=False)
    assert result.resumed_from == 2
    assert result.steps == 6
    steps = [json.loads(x)["step"] for x in result.metrics_path.read_text().splitlines()]
    assert steps == list(range(6)), steps  # step 2 was redone once, not counted twice
    cert = DpCertificate.read(result.adapter_dir / "dp_certificate.json")
    assert cert.steps == 6
    cert.verify_signature(signer.verifying_key())


def test_budget_refuses_the_step_that_would_exceed_it(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, signer: HybridSigningKey
) -> None:
    sigma = 1.0
    eps3 = compute_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=0.1, steps=3, delta=1e-5)
    eps4 = compute_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=0.1, steps=4, delta=1e-5)
    target = (eps3 + eps4) / 2
    path = _write_run(
        tmp_path, tiny_model_dir, privacy__noise_multiplier=sigma, privacy__target_epsilon=target
    )
    with pytest.raises(BudgetStopError, match="last allowed step") as info:
        train(load_config(path), signer=signer, show_progress=False)
    assert isinstance(info.value.budget_error, BudgetExceededError)
    assert info.value.budget_error.step == 4
    cert = DpCertificate.read(tmp_path / "run" / "adapter" / "dp_certificate.json")
    assert cert.steps == 3 and cert.epsilon is not None and cert.epsilon <= target
    assert cert.verify_signature(signer.verifying_key()) == signer.key_id  # signed before the stop


def test_non_private_run_says_so(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, signer: HybridSigningKey
) -> None:
    path = _write_run(tmp_path, tiny_model_dir, privacy={"enabled": False})
    result = train(load_config(path), signer=signer, show_progress=False)
    cert = DpCertificate.read(result.adapter_dir / "dp_certificate.json")
    assert cert.dp_enabled is False and cert.epsilon is None
    assert "not" in cert.statement.lower() or "no " in cert.statement.lower()


def test_dp_training_lowers_held_out_loss(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, signer: HybridSigningKey
) -> None:
    path = _write_run(
        tmp_path,
        tiny_model_dir,
        training={"steps": 30, "batch_size": 50, "micro_batch_size": 25, "checkpoint_every": 30, "seed": 1},
        privacy={"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0},
        optimizer={"learning_rate": 0.05},
    )
    result = train(load_config(path), signer=signer, show_progress=False)
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < result.eval_loss_before - 0.05, (
        result.eval_loss_before,
        result.eval_loss_after,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"privacy__delta": 0.5}, "delta"),
        ({"training__batch_size": 10_000}, "batch_size"),
        ({"privacy__clip_norm": -1}, "clip_norm"),
        ({"privacy__noise_multiplier": 0}, "noise_multiplier"),
        ({"privacy__target_epsilon": 0.01}, "target"),
        ({"model": "no-such-org/no-such-model"}, "no-such-org/no-such-model"),
    ],
)
def test_bad_config_is_one_line_error_and_leaves_nothing(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    override: dict[str, Any],
    message: str,
) -> None:
    path = _write_run(tmp_path, tiny_model_dir, **override)
    code = main(["train", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("tensafe: error:") and message in last
    assert not (tmp_path / "run" / "adapter").exists()


def test_unknown_config_key_rejected(tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path) -> None:
    path = _write_run(
        tmp_path, tiny_model_dir, privacy={"enabled": True, "target_epsilon": 8, "nois_multiplier": 1}
    )
    with pytest.raises(TrainingConfigError, match="nois_multiplier"):
        load_config(path)


def test_malformed_jsonl_names_file_and_line(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_run(tmp_path, tiny_model_dir)
    with open(tmp_path / "data" / "train.jsonl", "a") as fh:
        fh.write("{not json\n")
    assert main(["train", str(path), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert ("train.jsonl" in err and ":201" in err) or "line 201" in err


def test_per_example_loss_matches_hugging_face_loss(tiny_model_dir: pathlib.Path) -> None:
    """Oracle: HF's own causal-LM loss, one example at a time, on the unpadded sequence."""
    import torch

    from tensafe.training.data import collate, tokenize_examples
    from tensafe.training.lora import LoraSettings, apply_lora
    from tensafe.training.models import load_model_and_tokenizer
    from tensafe.training.trainer import evaluate_loss, per_example_loss

    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    model = apply_lora(model, LoraSettings(rank=2, target_modules=("q_proj",)), init_seed=0)
    records = synthesize_dataset("support", 5, seed=1).records
    examples = tokenize_examples(records, tok, max_length=256)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        ours = per_example_loss(model, batch)
        ref = [
            float(model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss)
            for ex in examples
        ]
    assert ours.tolist() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # Held-out loss is token-weighted over all examples.
    weights = [sum(1 for label in ex.labels[1:] if label != -100) for ex in examples]
    expected = sum(w * r for w, r in zip(weights, ref)) / sum(weights)
    assert evaluate_loss(model, examples, tok.pad_token_id, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_train_config_can_emit_a_verified_package(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path
) -> None:
    from tensafe.crypto.kem import HybridKemPrivateKey
    from tensafe.crypto.signing import HybridSigningKey
    from tensafe.package import RollbackState, unpack

    sk = HybridSigningKey.generate()
    rk = HybridKemPrivateKey.generate()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "signing.key").write_bytes(sk.private_bytes(passphrase=None))
    (keys / "recipient.pub").write_bytes(rk.public_key().public_bytes())
    path = _write_run(
        tmp_path,
        tiny_model_dir,
        training={"steps": 2, "batch_size": 20, "micro_batch_size": 10, "checkpoint_every": 2},
        package={
            "name": "tiny-adapter",
            "version": "1.0.0",
            "signing_key": "keys/signing.key",
            "recipients": ["keys/recipient.pub"],
        },
    )
    assert main(["train", str(path), "--no-progress"]) == 0
    pkg = tmp_path / "run" / "tiny-adapter-1.0.0.tssp"
    info = unpack(
        pkg,
        tmp_path / "unpacked",
        recipient_key=rk,
        trust=[sk.verifying_key()],
        state=RollbackState(tmp_path / "state.json"),
    )
    assert (tmp_path / "unpacked" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert info is not None


def test_lora_layers_restrict_adapters_to_chosen_blocks(tiny_llama: Any) -> None:
    from tensafe.training.lora import LoraSettings, apply_lora

    model = apply_lora(
        tiny_llama, LoraSettings(rank=2, target_modules=("q_proj", "v_proj"), layers_to_transform=(1,))
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
    assert len(names) == 4  # lora_A and lora_B of q_proj and v_proj in block 1


def test_lora_layers_config_validated(tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path) -> None:
    path = _write_run(tmp_path, tiny_model_dir, lora={"rank": 2, "layers": [-1]})
    with pytest.raises(TrainingConfigError, match=r"lora\.layers"):
        load_config(path)


def test_empty_dataset_is_one_line_error(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_run(tmp_path, tiny_model_dir)
    (tmp_path / "data" / "train.jsonl").write_text("", encoding="utf-8")
    assert main(["train", str(path), "--no-progress"]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tensafe: error:") and "train.jsonl" in last
    assert not (tmp_path / "run" / "adapter").exists()
