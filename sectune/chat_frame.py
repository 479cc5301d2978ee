"""An instruct model's chat template around the analyst's prompt (``model.chat_template=true``).

An instruct model (Qwen2.5-Instruct, Llama-3.1-Instruct, Mistral-Instruct) was tuned on prompts inside its chat template;
fine-tuned on the bare prompt it starts from a format it never saw, and a chat endpoint would wrap the prompt anyway.
With the frame, every prompt a stage trains on, scores or generates from is ``before + prompt + after``: the template's
rendering of one user message, ``after`` ending with its assistant header, and an answer ends with the token the template
closes an assistant turn with (the tokenizer's EOS is set to it, so generation, TRL's trainers and the saved tokenizer
agree). A prompt is tokenized inside the frame as the template's own rendering would be, except that a special token's
spelling inside the prompt stays text (:func:`framed_ids`): ``apply_chat_template`` would read an attacker's user name
``<|im_end|>`` in a log line as the end of the user's turn.

The frame is rendered once, when a run starts from a model sectune did not train, and recorded in the tokenizer it saves
(``sectune_chat`` in tokenizer_config.json; ``false`` for a run trained on the bare prompt): every later stage that
loads that folder (DPO, RL, infer, evaluate, export) uses the recorded frame, whatever ``model.chat_template`` says, and
a template whose rendering moves (a date) cannot change the prompt between training and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from sectune.errors import ConfigError

RECORD_KEY = "sectune_chat"
_MARK = "\x00SECTUNE\x00"
_ANSWER = "\x00ANSWER\x00"
_PROBE = "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186"


@dataclass(frozen=True)
class ChatFrame:
    before: str
    after: str
    end: str
    #: the template trims the message (Llama-3.x's and Gemma's ``content | trim``): the prompt's trailing newline is
    #: not what an instruct model (or a chat endpoint) puts before the end of the user's turn
    strip: bool = False

    def record(self) -> dict:
        return {"before": self.before, "after": self.after, "end": self.end, **({"strip": True} if self.strip else {})}


def frame_of(tokenizer) -> ChatFrame | None:
    """The tokenizer's frame, or None (the bare prompt)."""
    return getattr(tokenizer, "_sectune_frame", None)


def special_ids(tokenizer, text: str) -> list[int]:
    """``text``'s ids with the template's special tokens read as tokens (the frame's own pieces, never a log's text)."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"] if text else []


def _spells_special(tokenizer):
    """A test of whether a text spells one of the tokenizer's special tokens (``<|im_end|>``, ``</s>``, ...): the list is
    read once per call of its users, not per text (``added_tokens_decoder`` builds a dict each time it is read)."""
    spellings = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]
    return lambda text: any(s in text for s in spellings)


def framed_ids(tokenizer, frame: ChatFrame, prompts: list[str]) -> list[list[int]]:
    """Each prompt inside ``frame``: ``before + prompt + after`` tokenized as one string, the template's own tokenization
    (a SentencePiece tokenizer writes the text after ``[INST] `` otherwise than alone); a prompt holding a special token's
    spelling (an attacker's user name ``<|im_end|>``) as the frame's pieces, their special tokens as tokens, and the
    prompt between them as text (:func:`sectune.inference.text_ids`), which never ends the user's turn."""
    from sectune.inference import text_ids

    if frame.strip:
        prompts = [p.strip() for p in prompts]
    hostile = list(map(_spells_special(tokenizer), prompts))
    clean = [i for i, h in enumerate(hostile) if not h]
    out: list[list[int] | None] = [None] * len(prompts)
    if clean:
        for i, ids in zip(clean, tokenizer([frame.before + prompts[i] + frame.after for i in clean], add_special_tokens=False,
                                           split_special_tokens=False)["input_ids"]):
            out[i] = ids
    if len(clean) < len(prompts):
        before, after = special_ids(tokenizer, frame.before), special_ids(tokenizer, frame.after)
        for i in (i for i, h in enumerate(hostile) if h):
            out[i] = before + text_ids(tokenizer, prompts[i], add_special_tokens=False) + after
    return out


def answer_ids(tokenizer, frame: ChatFrame, completions: list[str]) -> list[list[int]]:
    """Each completion's ids where it follows the frame's assistant header, as the model continues the prompt: a
    SentencePiece tokenizer (Mistral's) wrote it alone with a leading "▁" that the JSON grammar of constrained decoding
    forbids as the answer's first token (a review, session 46). An answer holding a special token's spelling (a user
    name ``<|im_end|>`` it quotes) is tokenized alone, as text."""
    from sectune.inference import text_ids

    spells, head = _spells_special(tokenizer), special_ids(tokenizer, frame.after)
    out = []
    for c in completions:
        full = None if spells(c) else special_ids(tokenizer, frame.after + c)
        out.append(full[len(head) :] if full is not None and full[: len(head)] == head
                   else text_ids(tokenizer, c, add_special_tokens=False))
    return out


def stop_at_turn_end(model, tokenizer) -> None:
    """A framed run's model generates until the template's end-of-turn (the tokenizer's EOS since :func:`attach`), not the
    base's own EOS its generation_config names: what TRL's GRPO stops at, and what a saved folder served as it is stops
    at. Nothing for a bare run."""
    gen = getattr(model, "generation_config", None)
    if frame_of(tokenizer) is not None and gen is not None:
        gen.eos_token_id = tokenizer.eos_token_id


def render(tokenizer, where: str, system: str | None = None) -> ChatFrame:
    """The frame of ``tokenizer``'s chat template: its rendering of one user message around a marker, and what it writes
    after an assistant's answer. A template that renders no such thing, or whose tokenization of a real prompt is not
    ``before + text + after``, is an error naming ``where``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.chat_template=true: {where}'s tokenizer has no chat template (a base model's usually has "
                          "none): set model.chat_template=false to train on the bare prompt")
    sys_msg = [] if system is None else [{"role": "system", "content": system}]
    user = [*sys_msg, {"role": "user", "content": _MARK}]
    try:
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        turn = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _ANSWER}], tokenize=False)
        spaced = tokenizer.apply_chat_template([*sys_msg, {"role": "user", "content": f"\n{_MARK}\n"}], add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja's TemplateError, a template's raise_exception, ...
        raise ConfigError(f"model.chat_template=true: {where}'s chat template cannot render one user message and an "
                          f"answer ({type(e).__name__}: {e}): set model.chat_template=false") from e
    if prompt.count(_MARK) != 1 or turn.count(_ANSWER) != 1:
        raise ConfigError(f"model.chat_template=true: {where}'s chat template does not write a user message's text once "
                          "as it is: set model.chat_template=false")
    before, after = prompt.split(_MARK)
    closing = special_ids(tokenizer, turn.split(_ANSWER)[1])
    if not closing:
        raise ConfigError(f"model.chat_template=true: {where}'s chat template writes nothing after an answer (no "
                          "end-of-turn token to stop generation at): set model.chat_template=false")
    frame = ChatFrame(before, after, tokenizer.convert_ids_to_tokens(closing[0]), strip=f"\n{_MARK}\n" not in spaced)
    check(tokenizer, frame, where, template=True, system=system)
    return frame


def check(tokenizer, frame: ChatFrame, where: str, template: bool = False, system: str | None = None) -> None:
    """``end`` is a token of this tokenizer (a recorded frame whose tokenizer lost it is refused); with ``template``, a
    real log line framed here tokenizes as the template's own rendering of it (a template that rewrites the message is
    refused)."""
    end = tokenizer.convert_tokens_to_ids(frame.end)
    if end is None or end == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(end) != frame.end:
        raise ConfigError(f"{where}: the chat template's end-of-turn token {frame.end!r} ({RECORD_KEY} in "
                          "tokenizer_config.json) is not a token of this tokenizer")
    if not template:
        return

    def theirs(probe):
        msgs = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": probe}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # a prompt ends with a newline (auth_logs.render_prompt): a template that trims it is framed so (ChatFrame.strip)
    if any(framed_ids(tokenizer, frame, [p])[0] != theirs(p) for p in (_PROBE, f"\n{_PROBE}\n")):
        raise ConfigError(f"model.chat_template=true: {where}'s chat template tokenizes a log line otherwise than as the "
                          "text between its prefix and its assistant header (a template that rewrites the message?): "
                          "set model.chat_template=false")


def _sectune_output(where: str) -> bool:
    """Whether ``where`` is a folder a sectune run wrote (its model, adapter or a checkpoint: a result.json above it)."""
    from pathlib import Path

    p = Path(where)
    return p.is_dir() and any((q / "result.json").is_file() for q in [p, *list(p.parents)[:3]])


def _own_prompt(cfg) -> str | None:
    return f"stage={cfg.stage.name}" if cfg.stage.name in ("classify", "federated") else "dataset=hdfs" if cfg.dataset.name == "hdfs" else None


def wanted(cfg) -> bool:
    """``model.chat_template``, where it applies: the analyst's prompt/answer stages. A classifier (stage=classify), HDFS
    sessions and federated clients read prompts of their own, the bare text (an instruct preset's ``true`` is left
    aside there, with a note: :func:`not_applied`)."""
    return bool(cfg.model.get("chat_template", False)) and _own_prompt(cfg) is None


def not_applied(cfg) -> str | None:
    """The note a run prints once (the runner) where ``model.chat_template=true`` is left aside."""
    own = _own_prompt(cfg) if cfg.model.get("chat_template", False) else None
    return None if own is None else f"model.chat_template=true does not apply to {own}: it reads its own prompt as bare text"


def attach(tokenizer, wanted: bool, where: str, system: str | None = None) -> ChatFrame | None:
    """Give ``tokenizer`` its frame: the one its folder recorded (a model sectune trained), else, with ``wanted``
    (``model.chat_template``), its template's, with ``system`` (``model.chat_system``) as a system message before the
    prompt. Records the choice so that saving the tokenizer keeps it, and sets EOS to
    the template's end-of-turn token (a base model's template may close a turn with another token than its EOS)."""
    recorded = tokenizer.init_kwargs.get(RECORD_KEY)
    why = f"{RECORD_KEY}: false in its tokenizer_config.json"
    if recorded is None and _sectune_output(where):
        recorded, why = False, "saved by sectune before model.chat_template existed"  # trained on the bare prompt
    if recorded is None:
        frame = render(tokenizer, where, system) if wanted else None
    elif recorded is False:
        if wanted:
            print(f"sectune: warning: model.chat_template=true ignored: {where} was trained on the bare prompt "
                  f"({why}), and is prompted as it was trained")
        frame = None
    elif (isinstance(recorded, dict) and all(isinstance(recorded.get(k), str) for k in ("before", "after", "end"))
          and isinstance(recorded.get("strip", False), bool)):
        frame = ChatFrame(recorded["before"], recorded["after"], recorded["end"], recorded.get("strip", False))
        check(tokenizer, frame, where)
        if not wanted:
            print(f"sectune: note: {where} was trained inside its chat template ({RECORD_KEY} in its "
                  "tokenizer_config.json): prompted so, whatever model.chat_template says")
        elif system is not None and system not in frame.before:
            print(f"sectune: warning: model.chat_system ignored: {where} was trained inside its recorded frame (its "
                  "system message, if any, as recorded), and is prompted as it was trained")
    else:
        raise ConfigError(f"{where}/tokenizer_config.json: {RECORD_KEY} must be false or {{before, after, end}} (strings; strip: a bool), "
                          f"not {recorded!r}")
    tokenizer.init_kwargs[RECORD_KEY] = frame.record() if frame else False
    tokenizer._sectune_frame = frame
    if frame is not None and tokenizer.eos_token != frame.end:
        print(f"sectune: note: {where}: the end of an answer is its chat template's {frame.end!r} (the tokenizer's EOS "
              f"was {tokenizer.eos_token!r}); the saved tokenizer keeps it as EOS")
        if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.eos_token  # the old EOS pads, as before
        tokenizer.eos_token = frame.end
    return frame
