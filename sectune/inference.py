"""Model output → structured data. Parsed, never evaluated.

``extract_json`` finds the first JSON object in generated text, repairs the usual small-model
damage (trailing commas, single quotes, a missing closing brace) with ``json_repair``, and
raises ``ValueError`` saying why when there is no object to recover.
"""

from __future__ import annotations

import json

import torch


def extract_json(text: str) -> dict:
    return parse_json_output(text)[0]


def parse_json_output(text: str) -> tuple[dict, bool]:
    """``extract_json``'s object and whether it needed repair (the first balanced ``{...}`` was
    not plain JSON, or there was no balanced object). An answer that goes on to a second object with another
    ``verdict`` is refused (:class:`DuplicateKey`), as one object giving the key twice is: the first was kept and the
    contradicting second dropped without a word, an answer an injection could steer (an audit, session 41)."""
    obj, repaired, rest = _first_object(text)
    for _ in range(MAX_FOLLOWING):  # the objects after it, as far as they parse
        if "{" not in rest:
            break
        try:
            other, _, rest = _first_object(rest)
        except ValueError:
            break
        said = other.get("verdict")  # a verdict in so many words: not a repaired '{"verdict": ' cut short ("")
        if isinstance(said, str) and said.strip() and said != obj.get("verdict"):
            raise DuplicateKey(f"the output gives a second analysis with verdict {other['verdict']!r} after one with "
                               f"{obj.get('verdict')!r}; not one analysis")
    return obj, repaired


#: how many objects after the first an answer's other verdicts are looked for in
MAX_FOLLOWING = 8


def _first_object(text: str) -> tuple[dict, bool, str]:
    """(the first object, whether it needed repair, the text after it)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output (no '{' found)")
    candidate = text[start:]
    # The first balanced object, ignoring braces inside strings.
    depth, in_str, esc, end = 0, False, False, None
    for i, ch in enumerate(candidate):
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                end = i + 1
                break
    rest = candidate[end:] if end else ""
    candidate = candidate[:end] if end else candidate
    if _nesting(candidate) > MAX_NESTING:  # json (and json_repair) recurse: ~1,000 levels crashed the whole batch
        raise ValueError(f"the output nests more than {MAX_NESTING} levels deep; not an analysis")
    repaired = False
    try:
        obj = json.loads(candidate, parse_constant=_no_constant, object_pairs_hook=_no_duplicate_keys)
    except DuplicateKey:  # not "repaired" into one of its two answers: json kept the last one silently
        raise
    except (json.JSONDecodeError, ValueError):  # ValueError: e.g. an integer past Python's digit limit, or NaN
        import json_repair

        # json_repair keeps the last of two keys as json does: an answer cut short (or with a trailing comma) that
        # appended "verdict":"benign" was a valid, repaired, benign analysis
        if (twice := _repeated_key(candidate)) is not None:
            raise DuplicateKey(f"the output gives the key {twice!r} twice; not one analysis")
        obj, repaired = json_repair.loads(candidate), True
        # NaN / Infinity are not JSON: written back out they would make analyses.json invalid
        obj = json.loads(json.dumps(obj), parse_constant=_no_constant)
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"could not recover a JSON object from the output (got {type(obj).__name__})")
    return obj, repaired, rest


class DuplicateKey(ValueError):
    """An object that gives one key twice: ``{"verdict": "malicious", …, "verdict": "benign"}`` read as benign (the last
    one wins in json), an answer an injection could steer by appending a second verdict."""


def _no_duplicate_keys(pairs: list) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise DuplicateKey(f"the output gives the key {k!r} twice ({seen[k]!r} and {v!r}); not one analysis")
        seen[k] = v
    return seen


#: deeper output is refused before any parser recurses into it (an analysis nests 2-3 levels)
MAX_NESTING = 64


def _repeated_key(text: str) -> str | None:
    """The first key an object of ``text`` gives twice, read as json_repair reads broken JSON (cut short, trailing
    commas, keys in single quotes or none), or None."""
    stack: list = []  # per open container: the keys of an object so far (a set), or None for an array
    expect_key, i, n = False, 0, len(text)
    while i < n:
        ch = text[i]
        obj = stack[-1] if stack and stack[-1] is not None else None
        if ch in "\"'":
            j, esc = i + 1, False
            while j < n and (esc or text[j] != ch):
                esc = not esc and text[j] == "\\"
                j += 1
            token, i = text[i:j + 1], j + 1
            if obj is not None and expect_key:
                try:
                    key = json.loads(token) if ch == '"' else token[1:-1]
                except ValueError:
                    key = token[1:]
                if key in obj:
                    return key
                obj.add(key)
                expect_key = False
            continue
        if ch == "{":
            stack.append(set())
            expect_key = True
        elif ch == "[":
            stack.append(None)
        elif ch in "]}":
            if stack:
                stack.pop()
            expect_key = False
        elif ch == "," and obj is not None:
            expect_key = True
        elif obj is not None and expect_key and not ch.isspace() and ch != ":":  # a bare key, up to its colon
            j = i
            while j < n and text[j] not in ":,{}[]\"'":
                j += 1
            key = text[i:j].strip()
            if j < n and text[j] == ":" and key:
                if key in obj:
                    return key
                obj.add(key)
            expect_key, i = False, j
            continue
        i += 1
    return None


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], gen_cfg, batch_size: int = 4, constraint=None, stats: dict | None = None,
             max_seq_length: int | None = None, contexts: list[str] | None = None) -> list[str]:
    """Greedy or sampled continuations of ``prompts`` (left-padded batches), text only.

    A prompt longer than ``max_seq_length`` (default: the model's ``max_position_embeddings``) minus
    ``max_new_tokens`` keeps its first and last tokens (the instruction, the end of the input and the answer
    header) and loses its middle, with a warning: an input of 100k tokens would otherwise take memory without
    bound. ``stats["truncated"]`` counts them.

    ``constraint`` (a :class:`sectune.models.constrained.SchemaConstraint`) restricts every token to the
    schema; ``stats`` then receives ``forced`` (outputs whose close the token budget forced; ``forced_rows``: which;
    ``verdict_forced_rows``: those whose verdict the close wrote, :func:`gave_value`) and
    ``force_failures`` (forced closes the grammar refused: the budget was then not assured); ``truncated_rows`` lists
    the prompts (by index) whose middle was cut. ``contexts`` (one per prompt: the log window it carries) is what a
    grounded constraint's names must come from (``SchemaConstraint.grounded``).

    A LoRA model on a CPU decodes with its adapter folded into the base weights
    (:func:`sectune.models.modeling.merged_lora`; the weights are restored bit for bit afterwards).
    """
    from sectune.models.modeling import merged_lora

    limit = max_seq_length or getattr(model.config, "max_position_embeddings", None)
    budget = max(int(limit) - int(gen_cfg.max_new_tokens), 2) if limit else None
    with merged_lora(model) as m:
        return _generate(m, tokenizer, prompts, gen_cfg, batch_size, constraint, stats if stats is not None else {}, budget, contexts)


def gave_value(written: str, key: str = "verdict") -> bool:
    """Whether ``written`` (what a model wrote before constrained decoding forced its close) began ``key``'s value itself:
    a close forced before it writes the schema's shortest value, a verdict of "benign" the model never gave (an audit,
    session 41). The first character decides: the auth schema's verdicts differ in it."""
    import re

    return re.search(rf'"{re.escape(key)}"\s*:\s*(?:"[^"\\]|[^\s"])', written) is not None


def cut_middle(ids: list[int], budget: int | None) -> list[int]:
    """``ids`` if it fits ``budget`` tokens, else its first and last ``budget / 2`` tokens."""
    if budget is None or len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def text_ids(tokenizer, text, add_special_tokens: bool = True) -> list:
    """The ids of ``text`` (a string, or a list of them) with a control token's spelling inside it tokenized as characters:
    a log line holds what an attacker chose (an ssh user name ``</s>``, ``<|eot_id|>``, ``<|im_end|>``), which the
    tokenizer otherwise reads as its end-of-text token in the middle of the input. The tokenizer's own BOS is added
    as before (``add_special_tokens``); a real EOS is the caller's to append by id. Training, scoring and generation
    all tokenize text with it (an audit, session 43: TRL's trainers read such a string in a log as the token)."""
    return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


def prompt_ids(tokenizer, prompt):
    """The ids a model is prompted with for ``prompt`` (a string, or a list of them): its text as text (:func:`text_ids`),
    inside the tokenizer's chat template where the run has one (:func:`sectune.chat_frame.framed_ids`). Every stage
    tokenizes a prompt with it."""
    from sectune.chat_frame import frame_of, framed_ids

    frame = frame_of(tokenizer)
    if frame is None:
        return text_ids(tokenizer, prompt)
    if isinstance(prompt, str):
        return framed_ids(tokenizer, frame, [prompt])[0]
    return framed_ids(tokenizer, frame, list(prompt))


def prompt_completion_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(``prompt``'s ids, ``prompt + completion``'s ids and the real EOS id): what TRL's SFT and DPO trainers tokenize for
    a prompt/completion pair (they append ``eos_token`` as text and tokenize the whole), with the text as text
    (:func:`text_ids`); on text holding no control token's spelling, the same ids. Where the completion starts is the
    two lists' common prefix, as TRL takes it. Inside a chat template (:func:`prompt_ids`) the completion is tokenized
    where it follows the assistant header (:func:`sectune.chat_frame.answer_ids`)."""
    from sectune.chat_frame import answer_ids, frame_of

    frame = frame_of(tokenizer)
    if frame is not None:
        p = prompt_ids(tokenizer, prompt)
        return p, p + answer_ids(tokenizer, frame, [completion])[0] + [tokenizer.eos_token_id]
    return text_ids(tokenizer, prompt), text_ids(tokenizer, prompt + completion) + [tokenizer.eos_token_id]


def pair_lengths(tokenizer, prompts: list[str], completions: list[str]) -> list[int]:
    """The tokens each prompt + completion + EOS is trained as (:func:`prompt_completion_ids`), tokenized in batches."""
    from sectune.chat_frame import answer_ids, frame_of

    frame = frame_of(tokenizer)
    if frame is None:
        return [len(ids) + 1 for ids in text_ids(tokenizer, [p + c for p, c in zip(prompts, completions)])]
    if not prompts:
        return []
    return [len(a) + len(b) + 1 for a, b in zip(prompt_ids(tokenizer, list(prompts)), answer_ids(tokenizer, frame, list(completions)))]


def completion_ids(tokenizer, prompt: str, completion: str, prompt_ids: list[int] | None = None) -> list[int]:
    """``completion``'s tokens where it follows ``prompt``: those of ``prompt + completion`` past the prompt's (TRL's SFT
    and DPO split them so). Tokenized on its own, a SentencePiece tokenizer (Llama-2) wrote it with a leading "▁" that
    SFT and generation never produce after the prompt's newline (an audit, session 42). Text as text (:func:`text_ids`).
    Inside a chat template, where it follows the assistant header (:func:`sectune.chat_frame.answer_ids`)."""
    from sectune.chat_frame import answer_ids, frame_of

    frame = frame_of(tokenizer)
    if frame is not None:
        return answer_ids(tokenizer, frame, [completion])[0]
    p = prompt_ids if prompt_ids is not None else text_ids(tokenizer, prompt)
    full = text_ids(tokenizer, prompt + completion)
    n = 0
    for a, b in zip(p, full):
        if a != b:
            break
        n += 1
    if n < len(p):  # a token spans the boundary: the prompt's own ids stay whole, the completion is tokenized alone
        return text_ids(tokenizer, completion, add_special_tokens=False)
    return full[n:]


def _generate(model, tokenizer, prompts, gen_cfg, batch_size, constraint, stats, budget, contexts=None) -> list[str]:
    from transformers import LogitsProcessorList

    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outs: list[str] = []
    was_cut = 0
    for i in range(0, len(prompts), batch_size):
        # a log line's text stays text: a user name "</s>" or "<|eot_id|>" (an attacker's to choose) was read as the
        # tokenizer's own control token, an end of text inside the analyst's input (an audit, session 42)
        rows = prompt_ids(tokenizer, prompts[i : i + batch_size])
        cut = [cut_middle(r, budget) for r in rows]
        was_cut += sum(len(c) < len(r) for c, r in zip(cut, rows))
        stats.setdefault("truncated_rows", []).extend(i + j for j, (c, r) in enumerate(zip(cut, rows)) if len(c) < len(r))
        enc = tokenizer.pad({"input_ids": cut}, padding=True, return_tensors="pt").to(device)
        kwargs = dict(
            max_new_tokens=gen_cfg.max_new_tokens,
            do_sample=gen_cfg.do_sample,
            repetition_penalty=gen_cfg.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if gen_cfg.do_sample:
            kwargs.update(temperature=gen_cfg.temperature, top_p=gen_cfg.top_p)
        processor = None
        if constraint is not None:
            processor = constraint.processor(gen_cfg.max_new_tokens, None if contexts is None else contexts[i : i + batch_size])
            kwargs["logits_processor"] = LogitsProcessorList([processor])
        ids = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
        if processor is not None:
            outs.extend(constraint.decode(row) for row in ids.tolist())
            stats["forced"] = stats.get("forced", 0) + processor.forced
            stats.setdefault("forced_rows", []).extend(i + j for j in sorted(processor.forced_rows))
            # the forced answers whose verdict the close wrote (the shortest enum member: "benign", failing open)
            stats.setdefault("verdict_forced_rows", []).extend(
                i + j for j in sorted(processor.forced_rows) if not gave_value(processor.forced_prefix[j].decode("utf-8", "replace")))
            stats["force_failures"] = stats.get("force_failures", 0) + getattr(processor, "force_failures", 0)
        else:
            outs.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    if was_cut:  # once per call (it was once per batch)
        stats["truncated"] = stats.get("truncated", 0) + was_cut
        print(f"sectune: warning: {was_cut} of {len(prompts)} prompt(s) longer than {budget} tokens (the sequence length less "
              f"generation.max_new_tokens) lost their middle: the model saw their start and end only")
    return outs
