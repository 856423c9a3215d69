"""Chat templates a recipe may name (`chat_template: chatml`), and the choice of one: a name, `auto` (the
template most of the inputs carry), or a literal Jinja template."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mergekit_lite.checkpoint.writer import read_chat_template
from mergekit_lite.errors import RecipeError

# Each renders a list of {role, content} messages in its format; `add_generation_prompt` opens the reply.
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages -%}\n"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}\n"
    ),
    "llama3": (
        "{{- bos_token -}}\n"
        "{%- for message in messages -%}\n"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
        "+ '<|eot_id|>' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}\n"
    ),
    "mistral": (
        "{{- bos_token -}}\n"
        "{%- set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' "
        "else '' -%}\n"
        "{%- for message in messages if message['role'] != 'system' -%}\n"
        "{%- if message['role'] == 'user' -%}\n"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}\n"
        "{%- else -%}\n"
        "{{ message['content'] + eos_token }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    ),
    "alpaca": (
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}\n"
        "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}\n"
        "{%- else -%}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}\n"
    ),
    "exaone": (
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'assistant' -%}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}\n"
        "{%- elif message['role'] == 'system' -%}{{ '[|system|]' + message['content'] + '[|endofturn|]\\n' }}\n"
        "{%- else -%}{{ '[|user|]' + message['content'] + '\\n' }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}\n"
    ),
}

AUTO = "auto"
MIN_LITERAL_CHARS = 20  # shorter, or without a `{`, is a mistyped name rather than a template


def check_chat_template(value: str) -> None:
    """Refuse a value that is neither `auto`, a known name, nor something that reads as a Jinja template."""
    if value == AUTO or value in NAMED_TEMPLATES:
        return
    if len(value) < MIN_LITERAL_CHARS or "{" not in value:
        raise RecipeError(f"chat_template: {value!r} is neither a template nor a known name (auto, "
                          f"{', '.join(sorted(NAMED_TEMPLATES))})")


def choose_chat_template(value: str, input_templates: list[str | None]) -> str | None:
    """The template to write: a named one's text, a literal as given, or for `auto` the template most of the
    inputs carry (compared without surrounding white space; ties go to the first input's). None: `auto` and no
    input has a template, so none is written."""
    check_chat_template(value)
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if value != AUTO:
        return value
    present = [template.strip() for template in input_templates if template]
    if not present:
        return None
    return Counter(present).most_common(1)[0][0]


def output_chat_template(value: str | None, input_dirs: list[Path]) -> str | None:
    """The chat template an output's tokenizer gets for a recipe's `chat_template` (None: keep the copied one)."""
    if not value:
        return None
    return choose_chat_template(value, [read_chat_template(path) for path in input_dirs])
