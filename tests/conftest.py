"""Pytest setup: the Hugging Face libraries run offline, no test may open a connection off this machine, and the
tiny models of tests/tiny_models.py are built once per session (or once per machine, with BATCHRUN_TEST_MODELS).

Import-time work stays cheap: transformers is imported only when the models are built.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import ipaddress
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
from output_files import exited_pid
from tiny_models import TinyModels, build_all, built_in

# Forced, not defaulted: huggingface_hub reads these once, at its import, and a "0" in the shell must not win.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")

LOCAL_HOST_NAMES = {"localhost", "localhost.localdomain"}


class NetworkBlockedError(RuntimeError):
    """Not an OSError: libraries that read a failed connection as "offline, carry on" must not swallow it."""


def is_loopback(host) -> bool:
    if isinstance(host, str) and host.lower() in LOCAL_HOST_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])  # without an IPv6 scope such as %lo
    except ValueError:
        return False  # any other host name needs a DNS server, which is off this machine too
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def refuse_unless_loopback(address) -> None:
    if not is_loopback(address[0]):
        raise NetworkBlockedError(f"tests may not use the network: connection to {address!r} refused")


def guard_method(method):
    """socket.socket.connect or connect_ex, refusing internet addresses; Unix sockets pass (worker processes)."""
    def guarded(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse_unless_loopback(address)
        return method(sock, address, *args)
    return guarded


def guard_create_connection(create_connection):
    """Refuses before the name lookup, so a blocked host costs no DNS query either."""
    def guarded(address, *args, **kwargs):
        refuse_unless_loopback(address)
        return create_connection(address, *args, **kwargs)
    return guarded


@pytest.fixture(scope="session", autouse=True)
def own_datasets_cache(tmp_path_factory):
    """Non-streamed splits are converted into the datasets cache: each session gets its own, so tests never fill or
    read the user's, nor another session's (mutation testing runs sessions side by side)."""
    import datasets.config

    cache = tmp_path_factory.mktemp("datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(cache))  # for the runs started as child processes
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # read at import time, so set here too
        yield


@pytest.fixture(scope="session", autouse=True)
def block_network():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guard_method(socket.socket.connect))
        patch.setattr(socket.socket, "connect_ex", guard_method(socket.socket.connect_ex))
        patch.setattr(socket, "create_connection", guard_create_connection(socket.create_connection))
        yield


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny models' matmuls are dominated by thread start-up: on a shared 2-core machine one thread ran the
    generation tests about 10x faster. Runs started as child processes keep torch's default."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    cache = os.environ.get("BATCHRUN_TEST_MODELS")
    if not cache:
        return build_all(tmp_path_factory.mktemp("tiny_models"))
    return cached_models(Path(cache))


def cached_models(cache: Path) -> TinyModels:
    """The tiny models built once into `cache` and reused by later sessions: mutation testing starts a pytest
    session per mutant, and building them each time would cost more than most of the tests it runs.

    Keyed by the builders' source and the library versions, so a change to either builds a fresh set.
    """
    versions = [importlib.metadata.version(name) for name in ("torch", "transformers", "tokenizers")]
    key = hashlib.sha256((Path(__file__).with_name("tiny_models.py").read_text() + repr(versions)).encode())
    directory = cache / key.hexdigest()[:16]
    if not directory.exists():
        # built aside and renamed into place: parallel sessions never see, or write into, a half-built set
        building = cache / f".{directory.name}.tmp-{os.getpid()}"
        build_all(building)
        try:
            building.rename(directory)
        except OSError:  # another session finished first; its set is identical
            shutil.rmtree(building)
    return built_in(directory)


@pytest.fixture(scope="session")
def tiny_seq2seq(tiny_models):
    return tiny_models.seq2seq


@pytest.fixture(scope="session")
def tiny_causal_lm(tiny_models):
    return tiny_models.causal_lm


@pytest.fixture(scope="session")
def tiny_text_classifier(tiny_models):
    return tiny_models.text_classifier


@pytest.fixture(scope="session")
def tiny_token_classifier(tiny_models):
    return tiny_models.token_classifier


@pytest.fixture(scope="session")
def tiny_embedder(tiny_models):
    return tiny_models.embedder


@pytest.fixture(scope="session")
def tiny_image_classifier(tiny_models):
    return tiny_models.image_classifier


@pytest.fixture
def own_handlers():
    """{signum: signals received} while handlers of the test's own are installed for SIGTERM and SIGINT, so a signal
    that batchrun failed to handle is recorded here instead of ending pytest."""
    received = {signal.SIGTERM: [], signal.SIGINT: []}
    previous = {signum: signal.signal(signum, lambda number, _frame: received[number].append(number))
                for signum in received}
    yield received
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture
def dead_pid() -> int:
    return exited_pid()
