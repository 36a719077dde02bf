"""relay.context: where contexts live, which one is chosen, what they hold."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from relay import context
from relay.context import Context, ContextError


def env(tmp_path: Path, **more: str) -> dict[str, str]:
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home"), **more}


def test_config_dir_follows_xdg_else_home(tmp_path: Path) -> None:
    assert context.config_dir(env(tmp_path)) == tmp_path / "xdg" / "relay"
    assert context.config_dir({"HOME": str(tmp_path)}) == tmp_path / ".config" / "relay"


def test_save_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    e = env(tmp_path)
    c = Context("prod", {"sg": "rediss://a:6380/0", "fra": "rediss://b:6380/0"}, "tok", "")
    path = context.save(c, e)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = context.load("prod", e)
    assert back == c
    assert back.default_region == "sg"  # the first, in order
    assert context.current_name(e) is None  # saving does not select


def test_selection_option_then_env_then_current(tmp_path: Path) -> None:
    e = env(tmp_path)
    for name in ("a", "b", "c"):
        context.save(Context(name, {"r": "redis://x/0"}), e)
    context.use("a", e)
    assert context.selected_name(None, e) == "a"
    assert context.selected_name(None, {**e, "RELAY_CONTEXT": "b"}) == "b"
    assert context.selected_name("c", {**e, "RELAY_CONTEXT": "b"}) == "c"
    assert context.names(e) == ["a", "b", "c"]


def test_remove_clears_the_current_one(tmp_path: Path) -> None:
    e = env(tmp_path)
    context.save(
        Context("dev", {"local": "redis://x/0"}, dev_control="/tmp/s"), e, make_current=True
    )
    assert context.current_name(e) == "dev"
    context.remove("dev", e)
    assert context.current_name(e) is None
    with pytest.raises(ContextError, match="no context 'dev'"):
        context.load("dev", e)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ContextError, match="bad context name"):
        context.save(Context(name, {}), env(tmp_path))


def test_a_broken_file_is_a_context_error(tmp_path: Path) -> None:
    e = env(tmp_path)
    path = context.save(Context("x", {"r": "redis://x/0"}), e)
    path.write_text("{not json")
    with pytest.raises(ContextError, match="cannot read"):
        context.load("x", e)
    path.write_text('{"regions": {"r": {}}}')
    with pytest.raises(ContextError, match="no redis URL"):
        context.load("x", e)
