import pytest
import torch

from tlcourse import env


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("TLCOURSE_PROFILE", "full")
    assert env.profile() == "full"
    monkeypatch.setenv("TLCOURSE_PROFILE", " Quick ")
    assert env.profile() == "quick"


def test_profile_default_follows_cuda(monkeypatch):
    monkeypatch.delenv("TLCOURSE_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert env.profile() == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert env.profile() == "quick"


def test_bad_profile_is_explained(monkeypatch):
    monkeypatch.setenv("TLCOURSE_PROFILE", "fast")
    with pytest.raises(ValueError, match="quick, full"):
        env.profile()


def test_device_can_be_forced(monkeypatch):
    monkeypatch.setenv("TLCOURSE_DEVICE", "cpu")
    assert env.device() == torch.device("cpu")


def test_seeding_makes_runs_repeatable():
    env.seed_everything(3)
    a = torch.randn(5)
    env.seed_everything(3)
    assert torch.equal(a, torch.randn(5))


def test_setup_and_report(capsys):
    cfg = env.setup(seed=1)
    assert "profile=quick" in capsys.readouterr().out and cfg.quick
    info = env.report()
    assert info["torch"] == torch.__version__ and info["profile"] == "quick"
