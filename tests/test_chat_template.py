"""Chat templates LiteRT-LM renders byte for byte as transformers does (edge_mtp/checkpoint/chat_template.py).

The templates below are written for these tests with the constructs real Gemma templates use: a system turn folded
into the first user turn, `is string` tests on content, content parts, role mapping, `| trim`, `loop.first`,
`raise_exception`, `.get` on maps, `.strip()`, `is not none`, `eos_token`.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from edge_mtp.checkpoint.chat_template import CONVERSATIONS, fit_template, litertlm_conversations
from edge_mtp.util.errors import EdgeMtpError

from conftest import BUNDLE_CONTEXT, DEMO_CONTEXT
from helpers import assert_only_progress

GEMMA3_STYLE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- else -%}{%- set prefix = messages[0]['content'][0]['text'] | trim + '\n\n' -%}{%- endif -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('roles alternate') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
GEMMA4_STYLE = """{{ bos_token }}
{%- for message in messages %}
    {%- set role = 'model' if message.get('role') == 'assistant' else message['role'] %}
<start_of_turn>{{ role }}
{{ message['content'].strip() }}
    {%- if message.get('tool_calls', none) is not none %}[tools]{% endif %}<end_of_turn>
{% endfor %}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif %}"""
EOS_STYLE = """{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\
{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"""
NO_SYSTEM = GEMMA3_STYLE.replace("{%- if messages[0]['role'] == 'system' -%}",
                                 "{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('no system') }}")
UNFIXABLE = """{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'].zfill(3) }}
{% endfor %}"""


@pytest.fixture(scope="module")
def tokenizer(synth_pair):
    """transformers' tokenizer of the tiny pair (bos <bos>, eos <eos>): the reference renderer."""
    return AutoTokenizer.from_pretrained(str(synth_pair / "target"))


def transformers_renderings(tokenizer, template: str, names: list[str]) -> list[str]:
    """apply_chat_template (transformers' public API) on each named conversation, generation prompt on."""
    return [tokenizer.apply_chat_template(CONVERSATIONS[n], chat_template=template, tokenize=False,
                                          add_generation_prompt=True) for n in names]


@pytest.mark.parametrize("template, status, adaptations, names", [
    (GEMMA3_STYLE, "identical", [], ["single turn", "multi-turn", "system"]),
    (NO_SYSTEM, "identical", [], ["single turn", "multi-turn"]),
    (GEMMA4_STYLE, "adapted", ["content parts to text", "map and string methods", "none tests"],
     ["single turn", "multi-turn", "system"]),
    (EOS_STYLE, "adapted", ["content parts to text", "special tokens as literals"],
     ["single turn", "multi-turn", "system"]),
], ids=["gemma3-style", "no-system", "gemma4-style", "eos"])
def test_fitted_template_renders_in_litertlm_exactly_as_transformers(tiny_bundle, tokenizer, template, status,
                                                                     adaptations, names):
    fit = fit_template(template, tokenizer.special_tokens_map, tiny_bundle[0], BUNDLE_CONTEXT)
    assert (fit.status, fit.adaptations, fit.conversations) == (status, adaptations, names)
    # checked independently of fit_template: LiteRT-LM's renderer on the fitted template vs apply_chat_template
    got = litertlm_conversations(tiny_bundle[0], BUNDLE_CONTEXT, [(fit.template, CONVERSATIONS[n], 0) for n in names])
    want = transformers_renderings(tokenizer, template, names)
    assert ["<bos>" + r.text for r in got] == want
    if adaptations:  # and the template as the checkpoint wrote it does differ there
        raw = litertlm_conversations(tiny_bundle[0], BUNDLE_CONTEXT, [(template, CONVERSATIONS[names[0]], 0)])[0]
        assert raw.error or "<bos>" + raw.text != want[0]


def test_a_construct_litertlm_lacks_is_named_and_the_flag_records_it(tiny_bundle, tokenizer):
    with pytest.raises(EdgeMtpError, match=r"no method named zfill.*--allow-template-mismatch"):
        fit_template(UNFIXABLE, tokenizer.special_tokens_map, tiny_bundle[0], BUNDLE_CONTEXT)
    fit = fit_template(UNFIXABLE, tokenizer.special_tokens_map, tiny_bundle[0], BUNDLE_CONTEXT, allow_mismatch=True)
    assert fit.template == UNFIXABLE and fit.status == "mismatch allowed" and "zfill" in fit.mismatch


def test_demo_bundle_template_renders_as_transformers(demo_bundle):
    """The issue's own example: Gallery's message no longer reaches the model wrapped in JSON."""
    from edge_mtp.demo import target_dir
    from edge_mtp.bundle.litertlm import read_litertlm

    assert read_litertlm(demo_bundle).manifest["chat_template"]["status"] == "identical"
    demo = AutoTokenizer.from_pretrained(str(target_dir()))
    names = list(CONVERSATIONS)
    got = litertlm_conversations(demo_bundle, DEMO_CONTEXT, [(None, CONVERSATIONS[n], 0) for n in names])
    want = [demo.apply_chat_template(CONVERSATIONS[n], tokenize=False, add_generation_prompt=True) for n in names]
    assert ["<bos>" + r.text for r in got] == want
    assert got[0].text == "<start_of_turn>user\nWhat does the open() function return?<end_of_turn>\n<start_of_turn>model\n"


def test_export_stores_the_adapted_template_and_records_it(synth_pair, tmp_path):
    """The whole path: a checkpoint whose template LiteRT-LM cannot render as is, exported by the CLI."""
    import json
    import shutil

    from click.testing import CliRunner

    from edge_mtp.cli import main
    from edge_mtp.bundle.litertlm import read_litertlm

    from conftest import BUNDLE_PREFILL

    target = tmp_path / "target"
    shutil.copytree(synth_pair / "target", target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEMMA4_STYLE}))
    out = tmp_path / "adapted.litertlm"
    # the target alone: the template is the tokenizer's and the target's, the drafter plays no part in it
    prefill = ",".join(map(str, BUNDLE_PREFILL))
    result = CliRunner().invoke(main, ["export", "--target", str(target), "--no-assistant", "--out", str(out),
                                       "--context", str(BUNDLE_CONTEXT), "--prefill", prefill])
    assert result.exit_code == 0, result.output
    assert_only_progress(result.stderr)
    entry = read_litertlm(out).manifest["chat_template"]
    assert entry["status"] == "adapted" and entry["adaptations"] == ["content parts to text", "map and string methods",
                                                                     "none tests"]
    names = entry["conversations"]
    got = litertlm_conversations(out, BUNDLE_CONTEXT, [(None, CONVERSATIONS[n], 0) for n in names])  # its own
    want = transformers_renderings(AutoTokenizer.from_pretrained(str(target)), GEMMA4_STYLE, names)
    assert ["<bos>" + r.text for r in got] == want
    import edge_mtp  # and `run --chat` feeds the model the same text

    assert edge_mtp.load(out).tokenizer.chat(CONVERSATIONS["single turn"][0]["content"]) == want[0][len("<bos>"):]
