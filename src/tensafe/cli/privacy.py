"""``tensafe privacy``: ε for given noise, noise for a target ε, and certificate checks.

Values are parsed here rather than by argparse so that a bad value gets the CLI's
one-line ``tensafe: error: ...`` message and exit status 2. ``tensafe.privacy`` (which
loads numpy and scipy) is imported inside the handlers to keep ``tensafe --help`` fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

from tensafe.errors import ConfigurationError

__all__ = ["register"]


def _float(flag: str, text: str | None) -> float:
    try:
        value = float(str(text))
    except ValueError:
        raise ConfigurationError(f"{flag} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{flag} must be finite, got {text!r}")
    return value


def _int(flag: str, text: str | None) -> int:
    try:
        return int(str(text), 10)
    except ValueError:
        raise ConfigurationError(f"{flag} must be an integer, got {text!r}") from None


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling", "give --sample-rate and --steps, or --dataset-size, --batch-size and --epochs"
    )
    group.add_argument("--sample-rate", metavar="Q", help="Poisson sampling rate q in (0, 1]")
    group.add_argument("--steps", metavar="T", help="number of DP-SGD steps")
    group.add_argument("--dataset-size", metavar="N", help="training examples (q = B/N)")
    group.add_argument("--batch-size", metavar="B", help="expected batch size")
    group.add_argument("--epochs", metavar="E", help="epochs (T = ceil(E·N/B))")


def _sampling(args: argparse.Namespace) -> tuple[float, int, int | None]:
    """Return ``(q, T, N or None)`` from either form of the sampling flags."""
    direct = args.sample_rate is not None or args.steps is not None
    derived = any(v is not None for v in (args.dataset_size, args.batch_size, args.epochs))
    if direct and derived:
        raise ConfigurationError(
            "give either --sample-rate and --steps, or --dataset-size, --batch-size and --epochs, not both"
        )
    if derived:
        if args.dataset_size is None or args.batch_size is None or args.epochs is None:
            raise ConfigurationError("--dataset-size, --batch-size and --epochs must be given together")
        n = _int("--dataset-size", args.dataset_size)
        b = _int("--batch-size", args.batch_size)
        epochs = _float("--epochs", args.epochs)
        if n < 1 or b < 1 or b > n:
            raise ConfigurationError(f"need 1 <= --batch-size <= --dataset-size, got B={b}, N={n}")
        if epochs <= 0:
            raise ConfigurationError(f"--epochs must be > 0, got {epochs:g}")
        return b / n, math.ceil(epochs * n / b), n
    if args.sample_rate is None or args.steps is None:
        raise ConfigurationError(
            "give --sample-rate and --steps, or --dataset-size, --batch-size and --epochs"
        )
    return _float("--sample-rate", args.sample_rate), _int("--steps", args.steps), None


def _quiet_library_logs(args: argparse.Namespace) -> None:
    """Hide dp_accounting's per-order convergence warnings unless -v was given.

    They report RDP orders excluded from the minimum, which can only make ε larger
    (never smaller), so they are not a correctness problem for the printed result.
    """
    if not getattr(args, "verbose", 0):
        logging.getLogger("absl").setLevel(logging.ERROR)


def _emit(human: str, payload: dict[str, Any], as_json: bool) -> None:
    print(human)
    if as_json:
        print(json.dumps(payload, sort_keys=False, allow_nan=False))


def _cmd_epsilon(args: argparse.Namespace) -> int:
    from tensafe.privacy import epsilon_report, validate_delta
    from tensafe.privacy.accountants import get_accountant_class

    _quiet_library_logs(args)
    q, steps, n = _sampling(args)
    sigma = _float("--noise-multiplier", args.noise_multiplier)
    delta = _float("--delta", args.delta)
    if n is not None:
        validate_delta(delta, n)
    report = epsilon_report(
        accountant=args.accountant, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta
    )
    title = get_accountant_class(args.accountant).title
    human = (
        f"ε = {report.epsilon:.4f} at δ = {delta:g} after {steps} steps (σ = {sigma:g}, q = {q:g}, {title})"
    )
    if "epsilon_estimate" in report.details:
        human += (
            f"; estimate {report.details['epsilon_estimate']:.4f}, "
            f"bounds [{report.details['epsilon_lower']:.4f}, {report.details['epsilon_upper']:.4f}]"
        )
    payload = {
        **report.to_dict(),
        "noise_multiplier": sigma,
        "sample_rate": q,
        "steps": steps,
    }
    _emit(human, payload, args.json)
    return 0


def _cmd_noise(args: argparse.Namespace) -> int:
    from tensafe.privacy import calibrate_noise, compute_epsilon, validate_delta
    from tensafe.privacy.accountants import get_accountant_class

    _quiet_library_logs(args)
    q, steps, n = _sampling(args)
    target = _float("--target-epsilon", args.target_epsilon)
    delta = _float("--delta", args.delta)
    tolerance = _float("--tolerance", args.tolerance)
    if n is not None:
        validate_delta(delta, n)
    sigma = calibrate_noise(
        target_epsilon=target,
        delta=delta,
        sample_rate=q,
        steps=steps,
        accountant=args.accountant,
        tolerance=tolerance,
    )
    eps = compute_epsilon(
        accountant=args.accountant, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta
    )
    title = get_accountant_class(args.accountant).title
    human = (
        f"σ = {sigma:.4f} gives ε = {eps:.4f} <= {target:g} at δ = {delta:g} after {steps} steps "
        f"(q = {q:g}, {title})"
    )
    payload = {
        "noise_multiplier": sigma,
        "epsilon": eps,
        "target_epsilon": target,
        "delta": delta,
        "accountant": args.accountant,
        "sample_rate": q,
        "steps": steps,
    }
    _emit(human, payload, args.json)
    return 0


def _public_keys(paths: list[str]) -> list[Any]:
    from pathlib import Path

    from tensafe.crypto import CryptoError
    from tensafe.crypto.signing import HybridVerifyingKey

    keys = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the public key {path}: {exc.strerror or exc}") from None
        try:
            keys.append(HybridVerifyingKey.from_public_bytes(data))
        except CryptoError as exc:
            raise ConfigurationError(f"{path} is not a TenSafe public key: {exc}") from None
    return keys


def _cmd_certificate(args: argparse.Namespace) -> int:
    from tensafe.privacy import DpCertificate

    if args.verify and not args.public_key:
        raise ConfigurationError(
            "--verify checks the certificate's signature and needs the deployment's public key: pass "
            "--public-key PUB (written by 'tensafe keys export-public-key')"
        )
    keys = _public_keys(args.public_key or [])
    cert = DpCertificate.read(args.path)
    human = cert.statement
    if args.verify:
        key_id = cert.verify_signature(keys)
        if cert.private:
            cert.recompute_epsilon()
            human += f" [signed by {key_id}: valid; ε recomputed from the recorded events: matches]"
        else:
            human += f" [signed by {key_id}: valid]"
    else:
        human += " [signature not checked: use --verify --public-key PUB]"
    _emit(human, cert.to_dict(), args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tensafe privacy`` and its subcommands."""
    parser = subparsers.add_parser(
        "privacy",
        help="differential-privacy accounting: ε, noise calibration, certificates",
        description="Differential-privacy accounting for Poisson-sampled DP-SGD (see docs/privacy.md).",
    )
    sub = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda _args: parser.print_help() or 2)

    eps = sub.add_parser("epsilon", help="ε spent by T steps with noise σ at sample rate q")
    eps.add_argument("--accountant", default="rdp", help="rdp (default), prv, pld or moments")
    eps.add_argument("--noise-multiplier", metavar="S", required=True, help="σ > 0")
    eps.add_argument("--delta", metavar="D", required=True, help="δ in (0, 1)")
    _add_sampling(eps)
    eps.add_argument("--json", action="store_true", help="also print a JSON object as the last line")
    eps.set_defaults(handler=_cmd_epsilon)

    noise = sub.add_parser("noise", help="smallest σ whose ε after T steps is at most the target")
    noise.add_argument("--accountant", default="rdp", help="rdp (default), prv, pld or moments")
    noise.add_argument("--target-epsilon", metavar="E", required=True, help="ε budget > 0")
    noise.add_argument("--delta", metavar="D", required=True, help="δ in (0, 1)")
    noise.add_argument("--tolerance", metavar="R", default="1e-3", help="relative slack below the target")
    _add_sampling(noise)
    noise.add_argument("--json", action="store_true", help="also print a JSON object as the last line")
    noise.set_defaults(handler=_cmd_noise)

    cert = sub.add_parser("certificate", help="validate a dp_certificate.json and print its statement")
    cert.add_argument("path", metavar="PATH", help="path of the certificate")
    cert.add_argument(
        "--verify",
        action="store_true",
        help="check the signature with --public-key and recompute ε from the recorded events",
    )
    cert.add_argument(
        "--public-key",
        metavar="PUB",
        action="append",
        help="the deployment's public key (repeatable: keys before and after a rotation)",
    )
    cert.add_argument("--json", action="store_true", help="also print the certificate as one JSON line")
    cert.set_defaults(handler=_cmd_certificate)
