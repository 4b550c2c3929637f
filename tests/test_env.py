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


def test_course_seed_from_environment(monkeypatch):
    monkeypatch.delenv("TLCOURSE_SEED", raising=False)
    assert env.course_seed() == 0
    monkeypatch.setenv("TLCOURSE_SEED", " 7 ")
    assert env.course_seed() == 7
    cfg = env.setup(verbose=False)
    assert cfg.seed == 7
    assert env.setup(seed=2, verbose=False).seed == 2      # an explicit seed wins
    assert env.report()["seed"] == 7


@pytest.mark.parametrize("value, message", [("one", "not an integer"), ("-1", "negative")])
def test_bad_course_seed_is_explained(monkeypatch, value, message):
    monkeypatch.setenv("TLCOURSE_SEED", value)
    with pytest.raises(ValueError, match=message):
        env.setup(verbose=False)
    assert "invalid" in str(env.report()["seed"])


def test_seeds_for_repeated_runs_never_overlap_between_course_seeds():
    def cfg(seed):
        return env.RunConfig(profile="quick", device=torch.device("cpu"), seed=seed)

    assert cfg(0).seeds(3) == [0, 1, 2]
    runs = [set(cfg(s).seeds(5)) for s in range(4)]
    assert all(len(r) == 5 for r in runs)
    assert all(not (a & b) for i, a in enumerate(runs) for b in runs[i + 1:])


def test_setup_says_how_to_change_the_seed(monkeypatch, capsys):
    monkeypatch.delenv("TLCOURSE_SEED", raising=False)
    env.setup()
    assert "seed=0 (set TLCOURSE_SEED" in capsys.readouterr().out
    monkeypatch.setenv("TLCOURSE_SEED", "3")
    env.setup()
    out = capsys.readouterr().out
    assert "seed=3" in out and "set TLCOURSE_SEED" not in out
