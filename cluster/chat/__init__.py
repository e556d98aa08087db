"""Terminal chat against an OpenAI-compatible endpoint: streaming, history, slash commands.

The package, leaves first (each module imports only those above it):

- ``eos``: the model's EOS token ids (model files or the server's /tokenize) and their logit bias.
- ``terminal``: where a chat writes (Terminal) and how it reads a message (read_message).
- ``session``: settings, sampling options, the history (Conversation) and the slash commands.
- ``client``: the ``openai`` client, the model to ask for, one streamed answer and its stats.
- ``loop``: ask_once (``--prompt``) and the interactive loop (run_chat).

`llamacluster chat` (cluster/cli/chat_cmd.py) builds the settings and calls the loop.
"""

from cluster.chat.client import (
    AnswerStats,
    format_stats,
    make_client,
    prepare,
    resolve_model,
    stream_answer,
)
from cluster.chat.eos import (
    BIAS_LIMIT,
    EOS_CANDIDATES,
    eos_logit_bias,
    eos_token_ids_from_dir,
    lookup_eos_token_ids,
)
from cluster.chat.eos import _server_eos_ids as _server_eos_ids
from cluster.chat.loop import ask_once, run_chat
from cluster.chat.session import (
    HELP_TEXT,
    ChatSettings,
    Conversation,
    SamplingOptions,
    parse_command,
)
from cluster.chat.terminal import Terminal, read_message

__all__ = [
    "BIAS_LIMIT",
    "EOS_CANDIDATES",
    "HELP_TEXT",
    "AnswerStats",
    "ChatSettings",
    "Conversation",
    "SamplingOptions",
    "Terminal",
    "ask_once",
    "eos_logit_bias",
    "eos_token_ids_from_dir",
    "format_stats",
    "lookup_eos_token_ids",
    "make_client",
    "parse_command",
    "prepare",
    "read_message",
    "resolve_model",
    "run_chat",
    "stream_answer",
]
