"""`python3 -m tlcourse.bootstrap lab`: the news pop-up disabled for this server, a taken port seen."""

import json
import os
import socket

from tlcourse import bootstrap


def test_lab_config_disables_the_announcements_for_this_server_only(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", "/elsewhere")
    env = bootstrap.write_lab_config(tmp_path / "config")
    page = json.loads((tmp_path / "config" / "labconfig" / "page_config.json").read_text())
    assert page == {"disabledExtensions": {bootstrap.ANNOUNCEMENTS: True}}
    # Ahead of the learner's own config path, which stays in force; nothing else changed.
    assert env["JUPYTER_CONFIG_PATH"].split(os.pathsep) == [str(tmp_path / "config"), "/elsewhere"]
    assert {k: v for k, v in env.items() if k != "JUPYTER_CONFIG_PATH"} == \
        {k: v for k, v in os.environ.items() if k != "JUPYTER_CONFIG_PATH"}


def test_a_taken_port_is_recognised():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert bootstrap._port_in_use(port)
    assert not bootstrap._port_in_use(port)   # closed again


def test_lab_arguments_open_the_landing_notebook_on_the_whole_course(tmp_path):
    args = bootstrap.lab_arguments(tmp_path)
    assert f"--ServerApp.root_dir={tmp_path}" in args
    assert f"--LabApp.default_url=/lab/tree/{bootstrap.LANDING}" in args
