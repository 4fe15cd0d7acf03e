"""The label-free readout head (reranker.head: readout): each candidate scored from its own line.

A small LM binds a candidate's content to its label symbol poorly (multiple-choice symbol binding),
yet whether a candidate is the answer is linearly readable from the hidden state at the end of that
candidate's line. The readout scores candidate k as w . h(end of line k) + b: the model's last
hidden state (after its final norm) at the last token of the candidate's prompt line
(`rerank.prompting.prompts.encode_prompt_ends`, measured from the tokenizer's offsets, never assumed), through one
trained linear unit. Still one forward pass over the same prompt as the label heads; the K scores
go through the same K-way cross-entropy in training and the same calibration and fusion after.

The unit is a submodule of the base model (`READOUT_MODULE`), trained and saved by peft as a
`modules_to_save` module, so the adapter folder carries it (adapter_model.safetensors) and
`PeftModel.from_pretrained` restores it; `adapter_has_readout` tells from adapter_config.json. A
merged export (`rerank.export.save_merged`) holds it as `READOUT_FILE` beside the weights, and
`rerank.model.sources.load_model_and_tokenizer` attaches it again when it loads such a folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pipeline.errors import PipelineError
from rerank.prompting.prompts import LineSpans

READOUT_MODULE = "rerank_readout"  # attribute of the base causal LM holding the linear unit
READOUT_FILE = "readout.safetensors"  # the unit's weights in a merged model folder
# reranker.readout_aux_weight: a second unit trained beside a LABEL head and dropped afterwards
# (never saved, never read by the ranker: `has_readout` looks for READOUT_MODULE only).
AUX_MODULE = "rerank_readout_aux"


def attach_readout(model: torch.nn.Module, name: str = READOUT_MODULE) -> None:
    """Give `model` (a base causal LM, before peft wraps it) a zero-initialised readout unit: every
    candidate scores 0 at the start (a uniform choice), and the first step's gradient moves it.
    `name`: AUX_MODULE for the auxiliary unit of a label head."""
    hidden = model.config.hidden_size
    weight = model.get_input_embeddings().weight
    unit = torch.nn.Linear(hidden, 1, bias=True, device=weight.device, dtype=torch.float32)
    torch.nn.init.zeros_(unit.weight)
    torch.nn.init.zeros_(unit.bias)
    setattr(model, name, unit)


def has_readout(model: Any) -> bool:
    """True when `model` (base, peft-wrapped or merged) carries a readout unit."""
    try:
        return isinstance(getattr(model, READOUT_MODULE), torch.nn.Module)
    except AttributeError:
        return False


def adapter_has_readout(adapter_dir: str | Path) -> bool:
    """True when the adapter saved in `adapter_dir` trained a readout unit (its modules_to_save)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("modules_to_save") or []
    except (OSError, json.JSONDecodeError):
        raise PipelineError(f"{path} is missing or not valid JSON: point to an adapter written by the reranker trainer") from None
    return READOUT_MODULE in saved


def readout_scores(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor, name: str = READOUT_MODULE,
    layer: Optional[int] = None,
) -> torch.Tensor:
    """(B, K) readout scores of left-padded prompts; `ends` (B, K): the column of each candidate
    line's last token in the padded batch (`padded_ends`). With grad in training, without at ranking.
    `layer`: read that decoder layer's output instead of the last one (`line_end_hidden`)."""
    if not hasattr(model, "get_decoder"):  # e.g. DistributedDataParallel: its gradients sync only through its own forward
        raise PipelineError(
            f"the readout head reads the decoder's hidden states, which {type(model).__name__} does not expose: "
            "train it in one process (no accelerate launch), or use reranker.head=label_tokens"
        )
    unit = getattr(model, name)
    return unit(line_end_hidden(model, input_ids, mask, ends, layer).float()).squeeze(-1)


def line_end_hidden(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor, layer: Optional[int] = None
) -> torch.Tensor:
    """(B, K, D): the decoder's last hidden state (after its final norm) at each candidate line's last
    token of left-padded prompts; `ends` as in `readout_scores`. What the readout unit reads.
    `layer` (1..number of layers): the output of that decoder layer (counted from 1, the first
    layer's output) through the same final norm, so a unit reads every layer on one scale; None or
    the last layer = the last hidden state.
    `ends` (B, 2, K) = each line's first and last token (`padded_ends` of `LineSpans`): the lines
    are shown isolated (`isolated_attention`)."""
    decoder = model.get_decoder()
    spans = line_spans(ends)
    attention, positions = forward_inputs(model, mask, spans)
    ends = ends if spans is None else spans[:, 1]
    n_layers = len(decoder.layers)
    if layer is not None and not 1 <= layer <= n_layers:
        raise PipelineError(f"readout layer {layer} is outside the model's layers 1..{n_layers}: choose one of them")
    middle = layer is not None and layer < n_layers
    captured = []
    hook = decoder.layers[layer - 1].register_forward_hook(lambda mod, args, output: captured.append(output)) if middle else None
    try:
        out = decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    if middle:  # a layer's own output, taken by a hook: no reliance on how hidden_states are indexed
        layer_out = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
        hidden = decoder.norm(layer_out)
    else:
        hidden = out.last_hidden_state  # (B, L, D)
    return hidden.gather(1, ends[:, :, None].expand(-1, -1, hidden.shape[-1]))


def padded_ends(ends: Sequence[Sequence[int] | LineSpans], lengths: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """Each prompt's candidate-line ends (token indices in its own ids) as columns of a batch padded
    on the LEFT to `width` (prompt r starts at column width - lengths[r]): (B, K). For `LineSpans`
    (candidate_attention isolated) each line's first and last token: (B, 2, K)."""
    spans = [isinstance(row, LineSpans) for row in ends]
    if any(spans) != all(spans):
        raise PipelineError("a batch mixes isolated and causal candidate lines: encode every prompt with one prompt style")
    if all(spans) and spans:
        rows = [[[width - n + t for t in part] for part in row] for row, n in zip(ends, lengths)]
    else:
        rows = [[width - n + e for e in row] for row, n in zip(ends, lengths)]
    if len({len(r[-1]) if spans[0] else len(r) for r in rows}) != 1:
        raise PipelineError("prompts of one batch have different candidate counts: batch the readout by K")
    return torch.tensor(rows, dtype=torch.long, device=device)


def isolated_attention(mask: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(boolean 4D attention mask (B, 1, L, L), True = may attend, position ids (B, L)) that show
    each candidate line of left-padded prompts apart from the others; `mask` (B, L) the padding
    mask, `starts` / `ends` (B, K) each line's first and last column.

    A line's tokens attend to the prefix (every real token before the first line) and to their own
    line, causally, at positions that restart where the first line starts: a line's states are
    those of the prompt "prefix + that line" wherever it is drawn. Tokens between lines (a newline
    token of its own) are seen by no line. Tokens after the last line (the answer instruction)
    attend to every real token before them, at positions after the longest line."""
    B, L = mask.shape
    col = torch.arange(L, device=mask.device)
    in_line = (col[None, None, :] >= starts[:, :, None]) & (col[None, None, :] <= ends[:, :, None])  # (B, K, L)
    line = torch.where(in_line.any(1), in_line.float().argmax(1) + 1, 0)  # 1..K inside line k, 0 elsewhere
    prefix = (col[None, :] < starts[:, :1]) & mask.bool()
    after = col[None, :] > ends[:, -1:]
    causal_pos = padded_positions(mask)
    first = causal_pos.gather(1, starts[:, :1])  # the first line's first position: the prefix's length
    own_start = starts.gather(1, (line - 1).clamp(min=0))  # (B, L): the start of the line a token is in
    longest = (ends - starts + 1).max(1, keepdim=True).values
    positions = torch.where(line > 0, first + col[None, :] - own_start, causal_pos)
    positions = torch.where(after, first + longest + col[None, :] - ends[:, -1:] - 1, positions)
    key_real = mask.bool()[:, None, :]
    same_line = (line[:, :, None] == line[:, None, :]) & (line[:, :, None] > 0)
    sees = prefix[:, None, :] | same_line | after[:, :, None]  # (B, query, key); a prefix query sees only prefix keys anyway
    allowed = sees & key_real & (col[:, None] >= col[None, :])[None]
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=mask.device)[None]  # padding rows: never an empty row
    return allowed[:, None], positions


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids of left-padded prompts counting real tokens only, so a padded prompt sees
    the positions it has alone: what every forward over candidate lines as written uses."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def line_spans(ends: torch.Tensor) -> Optional[torch.Tensor]:
    """`padded_ends`' output as the spans that show candidate lines isolated ((B, 2, K): first and
    last columns), or None when it holds line ends only ((B, K): the lines as written)."""
    return ends if ends.dim() == 3 else None


def forward_inputs(model: Any, mask: torch.Tensor, spans: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask, position ids) for `model`'s forward over left-padded prompts: the padding mask
    and `padded_positions` when `spans` is None, else the candidate lines `spans` (B, 2, K) shown
    isolated (`isolated_attention`)."""
    if spans is None:
        return mask, padded_positions(mask)
    allowed, positions = isolated_attention(mask, spans[:, 0], spans[:, 1])
    return _as_kernel_mask(model, allowed), positions


def _as_kernel_mask(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    """`allowed` in the form the model's attention kernel applies as given (transformers' masking
    utilities pass a 4D mask through unchanged): boolean for SDPA (any query dtype; a float mask
    must match the query's, which differs from the weights' under autocast or a kbit-prepared
    model), additive float32 for eager (added to the scores, then promoted). Flash-attention kernels
    take only padding and would silently drop the mask: refused."""
    # DistributedDataParallel (multi-process label-head training) holds the model as .module.
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    raise PipelineError(
        f"candidate_attention isolated needs an attention kernel that applies a custom mask (sdpa or eager), "
        f"not {impl}: load the model with attn_implementation='sdpa'"
    )


def save_readout_unit(model: torch.nn.Module, directory: str | Path) -> None:
    """Write the (merged) model's readout unit to `directory`/READOUT_FILE."""
    from safetensors.torch import save_file

    unit = getattr(model, READOUT_MODULE)
    save_file({k: v.detach().cpu().contiguous() for k, v in unit.state_dict().items()}, str(Path(directory) / READOUT_FILE))


def load_readout_unit(model: torch.nn.Module, directory: str | Path) -> bool:
    """Attach the readout unit saved in `directory` (a merged export) to `model`; False when the
    folder has none."""
    path = Path(directory) / READOUT_FILE
    if not path.is_file():
        return False
    from safetensors.torch import load_file

    attach_readout(model)
    try:
        getattr(model, READOUT_MODULE).load_state_dict(load_file(str(path)))
    except RuntimeError as e:  # another hidden size: the file belongs to another model
        raise PipelineError(f"{path} does not fit this model ({str(e).splitlines()[0]}): export the run again") from None
    return True
