"""``tensafe chat``: a terminal conversation with a served model (docs/serving.md, "Clients").

Each line read from standard input is one user turn. The whole conversation so far is sent
to ``POST {base_url}/chat/completions`` with ``stream: true``; the answer's deltas are
printed as they arrive (Server-Sent Events, OpenAI's ``chat.completion.chunk`` objects),
and the answer joins the conversation. End of input (Ctrl-D) or ``/exit`` ends it.

The API key is read from ``--api-key-file`` (first line), else ``TENSAFE_API_KEY``, and sent
as ``Authorization: Bearer``; as in the SDK, plain ``http://`` is refused to a host that is
not loopback unless ``TENSAFE_ALLOW_INSECURE_HTTP=1``, and ``https://`` certificates are
verified (``TENSAFE_CA_BUNDLE``). Neither the key nor the conversation is logged. An error
answer of the server (OpenAI's ``{"error": {...}}``) stops the command with its message.

Only ``httpx`` and the SDK's transport checks are imported: never torch or the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["DEFAULT_CHAT_BASE_URL", "register"]

#: Where ``tensafe serve`` listens by default (its OpenAI-compatible API is under ``/v1``).
DEFAULT_CHAT_BASE_URL = "http://127.0.0.1:8001/v1"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``chat`` command."""
    parser = subparsers.add_parser(
        "chat",
        help="chat with a served model or adapter in the terminal (OpenAI chat completions, streaming)",
        description=(
            "Talk to a model served by 'tensafe serve' (or 'tensafe server' at /oai/api/v1): each input "
            "line is a user turn; the answer streams back. Ctrl-D or /exit ends the conversation."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="the model or adapter name (e.g. clinical or clinical@1.0.0)"
    )
    parser.add_argument(
        "--base-url",
        default=DEFAULT_CHAT_BASE_URL,
        help=f"the OpenAI-compatible API's base URL (default {DEFAULT_CHAT_BASE_URL}; "
        "tensafe server: http://HOST:8000/oai/api/v1)",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        default=None,
        help="file holding the API key (default: TENSAFE_API_KEY)",
    )
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (server default)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for an answer (default 300)"
    )
    parser.set_defaults(handler=_chat)


def _api_key(path: str | None) -> str:
    from tensafe.client import ClientConfigurationError
    from tensafe.client._http import resolve_api_key

    if path is None:
        return resolve_api_key(None)
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientConfigurationError(
            f"--api-key-file {path}: cannot read the file ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    if not first:
        raise ClientConfigurationError(f"--api-key-file {path}: the file is empty")
    return resolve_api_key(first)


def _error_message(status: int, raw: bytes) -> str:
    """The server's error message (OpenAI's shape, or the server's own), one line, never the key."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    message = ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
        elif isinstance(body.get("detail"), str):
            message = body["detail"]
    if not message:
        message = raw.decode("utf-8", "replace").strip()[:300] or "no message"
    return f"the server answered {status}: {' '.join(message.split())}"


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse an SSE stream of JSON ``data:`` events until ``data: [DONE]``."""
    from tensafe.client import APIResponseValidationError

    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise APIResponseValidationError("the server sent an event that is not JSON") from None
        if not isinstance(event, dict):
            raise APIResponseValidationError("the server sent an event that is not a JSON object")
        yield event


def _turn(
    client: Any, model: str, messages: list[dict[str, str]], args: argparse.Namespace, out: IO[str]
) -> str:
    """Send the conversation, print the streamed answer, return its text."""
    from tensafe.client import APIStatusError

    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "max_tokens": args.max_tokens,
    }
    if args.temperature is not None:
        body["temperature"] = args.temperature
    parts: list[str] = []
    with client.stream("POST", "chat/completions", json=body) as response:
        if response.status_code != 200:
            raise APIStatusError(
                _error_message(response.status_code, response.read()), status_code=response.status_code
            )
        for event in _events(response.iter_lines()):
            if "error" in event:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise APIStatusError(f"the server stopped the answer: {message}", status_code=500)
            for choice in event.get("choices") or []:
                delta = (choice or {}).get("delta") or {}
                text = delta.get("content")
                if isinstance(text, str) and text:
                    parts.append(text)
                    out.write(text)
                    out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def _chat(args: argparse.Namespace) -> int:
    import httpx

    from tensafe._version import __version__
    from tensafe.client import APIConnectionError, ClientConfigurationError
    from tensafe.client._http import check_transport_security, resolve_base_url, tls_verification

    if args.max_tokens < 1:
        raise ClientConfigurationError("--max-tokens must be at least 1")
    base_url = resolve_base_url(args.base_url)
    check_transport_security(base_url)
    key = _api_key(args.api_key_file)
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    client = httpx.Client(
        base_url=base_url + "/",
        headers={"Authorization": f"Bearer {key}", "User-Agent": f"tensafe-chat/{__version__}"},
        timeout=httpx.Timeout(args.timeout, connect=10.0),
        follow_redirects=False,
        verify=tls_verification(None),
    )
    try:
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text.strip() == "/exit":
                break
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            if interactive:
                print(f"{args.model}> ", end="", flush=True)
            try:
                answer = _turn(client, args.model, messages, args, sys.stdout)
            except httpx.HTTPError as exc:
                raise APIConnectionError(f"cannot reach {base_url}: {type(exc).__name__}") from None
            messages.append({"role": "assistant", "content": answer})
    finally:
        client.close()
    return 0
