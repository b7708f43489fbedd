"""The seam between pc-serve's supervisor and BentoML's private worker entry point: the command line
pc-serve builds parses with the installed BentoML's own command, and a BentoML whose entry point moved or
changed stops pc-serve at start with one clear line (not a crash loop of workers)."""

from __future__ import annotations

import importlib

import pytest

from service import supervisor


def test_the_worker_command_parses_with_bentomls_own_command():
    supervisor.check_worker_module()
    command = supervisor.worker_command("service.service:PCEncoder", 7, "PCEncoder", 2)
    assert command[1:3] == ["-m", "service.worker"]  # which runs BentoML's worker command with these arguments
    main = importlib.import_module(supervisor.WORKER_MODULE).main
    context = main.make_context("worker", command[3:])
    assert context.params["bento_identifier"] == "service.service:PCEncoder"
    assert (context.params["fd"], context.params["service_name"], context.params["worker_id"]) == (7, "PCEncoder", 2)


def test_a_moved_or_changed_entry_point_fails_loudly():
    with pytest.raises(supervisor.WorkerModuleChanged, match="has no worker entry point"):
        supervisor.check_worker_module("_bentoml_impl.worker.no_such_module")
    with pytest.raises(supervisor.WorkerModuleChanged, match="no longer takes socket_path"):
        supervisor.check_worker_module(options=("fd", "socket_path"))
