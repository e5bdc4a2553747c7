"""`edge-mtp chat` and the ChatSession under it: multi-turn on our loop with the KV cache kept across turns."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

import edge_mtp
from edge_mtp.cli import main
from edge_mtp.runtime.chat import ChatSession, TurnOptions
from edge_mtp.util.errors import EdgeMtpError


@pytest.fixture(scope="module")
def demo_model(demo_bundle):
    return edge_mtp.load(demo_bundle)


def test_second_turn_reuses_the_cache_and_decides_as_a_fresh_prefill(demo_model):
    from edge_mtp.demo import target_dir

    session = ChatSession(demo_model, TurnOptions(max_tokens=10))
    first = list(session.send("What does the open() function return?"))
    held = list(session.cached)  # turn 1's prompt and reply, but the reply's last token (never fed)
    second = list(session.send("And close()?"))
    # the prompt of turn 2 is transformers' rendering of the whole conversation, tokenized
    hf = AutoTokenizer.from_pretrained(str(target_dir()))
    conversation = session.messages[:-1]
    want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt = demo_model.tokenizer.encode(want[len("<bos>"):])
    assert session.cached[:len(prompt)] == prompt
    assert session.messages[1]["content"] == demo_model.tokenizer.decode([t for t in first if t not in (1, 5)])
    # all the cache held was reused, and the reply equals a generation that prefilled everything afresh
    assert session.last_stats.prompt_tokens == len(prompt) and session.reused == len(held) > len(prompt) // 2
    assert second == list(demo_model.generate(prompt, max_tokens=10))
    session.reset()
    assert session.messages == [] and list(session.send("What does the open() function return?")) == first


def test_chat_cli_scripted_session(demo_bundle, demo_model):
    script = "What does open() return?\n/stats\nAnd close()?\n/stats\n/reset\n/stats\n/help\n"
    result = CliRunner().invoke(main, ["chat", str(demo_bundle), "--max-tokens", "8"], input=script)
    assert result.exit_code == 0, result.output
    session = ChatSession(demo_model, TurnOptions(max_tokens=8))
    replies = [demo_model.tokenizer.decode([t for t in session.send(q) if t not in (1, 5)])
               for q in ("What does open() return?", "And close()?")]
    assert result.stdout.startswith("> " + replies[0] + "\n> > " + replies[1] + "\n> ")  # streamed, stop token hidden
    stats = re.findall(r"\[(\d+) tokens, ([\d.]+) tok/s.*?of which (\d+) reused.*?acceptance ([\d.]+)", result.stderr)
    assert len(stats) == 2 and int(stats[0][2]) == 0 and int(stats[1][2]) > 10  # turn 2 reuses turn 1's cache
    assert all(float(s[1]) > 0 and 0 <= float(s[3]) <= 1 for s in stats)
    assert "[new conversation]" in result.stderr and "[no reply yet]" in result.stderr
    assert "unknown command /help" in result.stderr


def test_chat_cli_options_are_checked_before_the_session(demo_bundle, tiny_bundle):
    runner = CliRunner()
    too_long = runner.invoke(main, ["chat", str(demo_bundle), "--draft-len", "9"], input="hi\n")
    assert too_long.exit_code == 2 and too_long.stderr.strip().splitlines()[-1].startswith("error: Draft length 9")
    no_template = runner.invoke(main, ["chat", str(tiny_bundle[0])], input="hi\n")
    assert no_template.exit_code == 2 and "no chat template" in no_template.stderr.strip().splitlines()[-1]


def test_a_conversation_past_the_context_is_reported_and_the_session_goes_on(demo_model):
    session = ChatSession(demo_model, TurnOptions(max_tokens=4))
    with pytest.raises(EdgeMtpError, match="/reset"):
        list(session.send("x " * 400))
    assert len(list(session.send("hi"))) > 0


def test_validate_chat_row_passes_the_demo_bundle_and_catches_a_template_that_differs(demo_bundle, tmp_path):
    import json
    import shutil

    from edge_mtp.demo import target_dir
    from edge_mtp.checks.validate import validate_chat

    report = validate_chat(demo_bundle, target_dir(), max_tokens=8)
    rows = {c.subject: c for c in report.checks}
    assert sorted(rows) == ["multi-turn conversation: LiteRT-LM Conversation (MTP) vs our loop",
                            "multi-turn conversation: LiteRT-LM Conversation (no MTP) vs our loop",
                            "template: LiteRT-LM vs transformers", "template: edge-mtp runtime vs transformers"]
    assert report.passed, [(c.subject, c.detail) for c in report.checks]
    # the checkpoint's template no longer maps 'assistant' to 'model': the bundle's renders differently now
    other = tmp_path / "target"
    shutil.copytree(target_dir(), other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("'model' if m['role'] == 'assistant' else ", "")
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    failed = {c.subject: c for c in validate_chat(demo_bundle, other, max_tokens=8, use_litert_lm=False).checks}
    assert not failed["template: edge-mtp runtime vs transformers"].passed
    assert "multi-turn conversation differs" in failed["template: edge-mtp runtime vs transformers"].detail


def test_chat_on_a_pseudo_terminal_shows_prompts_streams_and_leaves_on_ctrl_d(demo_bundle):
    """On a terminal native output is captured (edge_mtp/util/quiet.py): the prompt and reply must still get through."""
    import os
    import select
    import subprocess
    import sys
    import time

    fd, terminal = os.openpty()  # the CLI's stdin, stdout and stderr are the terminal's end
    child = subprocess.Popen([sys.executable, "-c", "from edge_mtp.cli import main; main()", "chat", str(demo_bundle),
                              "--max-tokens", "6"], stdin=terminal, stdout=terminal, stderr=terminal,
                             start_new_session=True)
    os.close(terminal)
    seen = b""

    def wait_for(text: bytes, timeout: float = 120) -> bool:
        nonlocal seen
        end = time.time() + timeout
        while time.time() < end and text not in seen:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        return text in seen

    try:
        assert wait_for(b"\n> ")
        os.write(fd, b"What does open() return?\n")
        assert wait_for(b"?\r\n") and wait_for(b"\n> ")  # the echoed question, then the reply and a new prompt
        os.write(fd, b"/stats\n")
        assert wait_for(b"reused from the cache")
        os.write(fd, b"\x04")  # Ctrl-D
        wait_for(b"\x00", 10)  # drain until the child closes the terminal
        assert child.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        child.kill()
        child.wait()
        os.close(fd)
    reply = seen.split(b"?\r\n", 1)[1].split(b"\n> ", 1)[0].strip()
    assert reply and b"INFO" not in seen and b"<end_of_turn>" not in seen
