"""Are greedy replies repeatable on every path, and does the graph decoder give generate()'s tokens?

Part 1, repeatable (the random-weight Qwen2.5-7B shape in 4-bit, whose logits are near-ties
everywhere, so any numeric difference between two calls shows up as another reply): the same questions
asked 5 times on each path the studio has, with adapter "bench" (seven projections) and a q/v-only
adapter "other" attached and active:
- chat, batch 1: the base, and the base + "bench";
- side by side, batch 2: base and "bench" columns in one generation;
- the scored report's path: `answers_for` under one lease (side by side, then base + retrieval).
It also records whether the base column equals the base chat, and the adapter column the adapter chat,
for each decoder.

Part 2, graphs equal generate() (a small Qwen2 trained inside the bench until its greedy replies
stand on clear margins, in 4-bit like the studio; then a Fast training job of the studio makes a real
adapter): the graph decoder's greedy tokens against plain `generate()`'s, for the base and the
base + adapter. Where they differ, the largest logit difference over the reply and the eager logits'
top-2 margin at the first different token are recorded.

    python bench/decode_repeatability.py [--tiny]      # GPU (~2 min with the model build); --tiny: CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (SEVEN, adapter_updates, add_random_adapter, build_model, build_trained_model, fact_rows,  # noqa: F401
                    use_decoder, write_results)

from studio.evaluate.report import ReportRequest, answers_for  # noqa: E402
from studio.evaluate.retrieval import SectionRetriever  # noqa: E402
from studio.model.generation import GenerationSettings, build_messages, generate_text  # noqa: E402
from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"
QUESTIONS = ["雾灯岛第3座灯塔叫什么？", "我该怎么成为守灯人？"]
TIMES = 5
DOC = Path(__file__).resolve().parent.parent / "data" / "wudeng_lighthouse.md"


def same(values) -> bool:
    return all(v == values[0] for v in values)


def ask_paths(manager, tokens: int, times: int = TIMES, questions=tuple(QUESTIONS)) -> dict:
    """Each path `times` times per question; which are repeatable, and do the columns equal the chats."""
    settings = GenerationSettings.greedy(tokens)
    retriever = SectionRetriever.from_document(str(DOC))
    request = ReportRequest("bench", [], SYSTEM, settings, retriever, 2)
    result = {"repeatable": {}, "base_column_equals_base_chat": [], "adapter_column_equals_adapter_chat": []}
    for question in questions:
        messages = build_messages(SYSTEM, [], question)
        runs = {"chat base (batch 1)": [], "chat adapter (batch 1)": [], "side by side (batch 2)": [],
                "report path": []}
        for _ in range(times):
            runs["chat base (batch 1)"].append(manager.chat(messages, settings))
            runs["chat adapter (batch 1)"].append(manager.chat(messages, settings, adapter="bench"))
            runs["side by side (batch 2)"].append(list(manager.stream_side_by_side(messages, "bench", settings))[-1])
            lease = manager.acquire("scoring (bench)", changes_model=False)
            try:
                runs["report path"].append(tuple(sorted(answers_for(lease, request, question).items())))
            finally:
                lease.release()
        for path, values in runs.items():
            result["repeatable"].setdefault(path, []).append(same(values))
        base_column, adapter_column = runs["side by side (batch 2)"][0]
        result["base_column_equals_base_chat"].append(base_column == runs["chat base (batch 1)"][0])
        result["adapter_column_equals_adapter_chat"].append(adapter_column == runs["chat adapter (batch 1)"][0])
        result.setdefault("replies", []).append({"base": base_column, "adapter": adapter_column})
    result["all_repeatable"] = all(all(v) for v in result["repeatable"].values())
    return result


def part_repeatable(args) -> dict:
    folder = build_model(Path(args.model_dir + ("-tiny" if args.tiny else "")), args.tiny)
    manager = ModelManager()  # the studio's default decode mode
    manager.load(ModelSpec(str(folder), "4bit"))
    add_random_adapter(manager, "other", ["q_proj", "v_proj"], seed=2)
    add_random_adapter(manager, "bench", SEVEN, seed=1)
    manager.require_loaded().model.set_adapter("other")  # another adapter, attached and active
    out = {}
    # the studio's default in full, and side by side with the rows on two streams (GPU: a recorded step
    # whose two rows run concurrently); plain generate() (slow on a GPU) and the batched-rows variant in short
    for mode, rows_alone, on_streams, times, questions in (
            ("graphs", True, None, TIMES, QUESTIONS), ("graphs", True, True, TIMES, QUESTIONS),
            ("eager", True, None, 2, QUESTIONS[:1]), ("graphs", False, None, 2, QUESTIONS[:1])):
        use_decoder(manager, mode)
        decoder = manager.require_loaded().decoder
        decoder.rows_alone = rows_alone
        if on_streams is not None:
            decoder.rows_on_streams = on_streams and decoder.use_graphs  # a no-op without CUDA
        label = mode + ("" if rows_alone else ", rows batched (rows_alone off)") + (
            ", rows on two streams" if on_streams else "")
        started = time.perf_counter()
        out[label] = ask_paths(manager, args.tokens if mode == "graphs" else min(args.tokens, 24), times, questions)
        out[label]["times_asked"] = times
        out[label]["seconds"] = round(time.perf_counter() - started, 1)
        out[label]["decoder_problem"] = manager.require_loaded().decoder.problem
        out[label]["adapter_updates"] = adapter_updates(manager.require_loaded().decoder)
        out[label]["recorded_on_streams"] = any(getattr(step, "rows_on_streams", False)
                                                for step in getattr(decoder, "_steps", {}).values())
        print(label, json.dumps(out[label], ensure_ascii=False), flush=True)
    # the same kernels, only scheduled apart: the columns must be those of the rows one after another
    out["rows_on_streams_columns_equal_default_columns"] = (
        out["graphs, rows on two streams"]["replies"] == out["graphs"]["replies"])
    graphs, eager = out["graphs"]["replies"][0], out["eager"]["replies"][0]
    # near-ties everywhere: informative only (eager asked for fewer tokens: its reply is a prefix)
    out["graphs_equals_eager_on_random_weights"] = all(graphs[k].startswith(eager[k].rstrip("\ufffd")) for k in graphs)
    return out


class LogitRecorder:
    """Keeps the logits the graph decoder chooses each token from (prefill, then every step)."""

    def __init__(self, decoder):
        self.logits, self.decoder = [], decoder
        prefill, advance = decoder._prefill, decoder._advance
        decoder._prefill = lambda *a, **k: self._keep(prefill(*a, **k), fresh=True)
        decoder._advance = lambda *a, **k: self._keep(advance(*a, **k))

    def _keep(self, value, fresh=False):
        if fresh:
            self.logits = []
        self.logits.append(value[0].float().cpu())
        return value


def eager_logits(loaded, messages, tokens: list[int], adapter):
    """Plain forward logits over prompt + reply (no cache), row routed as the decoders route it."""
    import torch

    from studio.model.routing import route_rows

    prompt = loaded.tokenizer([loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)],
                              return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt, torch.tensor([tokens], dtype=torch.long)], dim=1).to(loaded.model.device)
    with torch.inference_mode(), route_rows(loaded.model, [adapter]):
        logits = loaded.model(input_ids=ids, use_cache=False).logits[0].float().cpu()
    return logits[prompt.shape[1] - 1:]


def compare_decoders(manager, adapter, tokens: int) -> list[dict]:
    import torch

    settings = GenerationSettings.greedy(tokens)
    loaded = manager.require_loaded()
    use_decoder(manager, "graphs")
    recorder = LogitRecorder(loaded.decoder)
    rows = []
    for question, answer in fact_rows(4, offset=2):
        messages = build_messages(SYSTEM, [], question)
        for _ in range(2):  # the first reply records the step; the second replays it
            graph_reply = manager.chat(messages, settings, adapter=adapter)
        graph_logits = torch.stack(recorder.logits)
        with manager.using("reference", changes_model=False):
            from studio.model.routing import route_rows

            with route_rows(loaded.model, [adapter]):
                reference = generate_text(loaded.model, loaded.tokenizer, manager.render_prompt(messages), settings)
        graph_tokens = graph_logits.argmax(-1).tolist()
        eager = eager_logits(loaded, messages, graph_tokens, adapter)[:len(graph_tokens)]
        row = {"question": question, "graph_equals_generate": graph_reply == reference,
               "reply_matches_training_answer": graph_reply.startswith(answer[:8]),
               "max_abs_logit_diff": round(float((graph_logits - eager).abs().max()), 5),
               "smallest_top2_margin": round(float((lambda t: (t[:, 0] - t[:, 1]).min())(eager.topk(2).values)), 5)}
        differing = [i for i, (g, e) in enumerate(zip(graph_tokens, eager.argmax(-1).tolist())) if g != e]
        if differing:
            top2 = eager[differing[0]].topk(2).values
            row["first_different_token"] = differing[0]
            row["eager_top2_margin_there"] = round(float(top2[0] - top2[1]), 5)
        rows.append(row)
    return rows


def part_graphs_equal_eager(args) -> dict:
    from studio.jobs import JobBoard, JobStatus
    from studio.train.job import RunRequest
    from studio.train.service import new_run_dir, start_training
    from studio.train.settings import LoraSettings, preset

    folder = build_trained_model(Path(args.small_dir + ("-tiny" if args.tiny else "")), 60 if args.tiny else 300, SYSTEM)
    manager = ModelManager()
    manager.load(ModelSpec(str(folder), "4bit"))
    work = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    dataset = work / "facts.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": q, "output": a.replace("阿岚", "阿满")}, ensure_ascii=False)
                               + "\n" for q, a in fact_rows(16, offset=2)), encoding="utf-8")
    train = preset("fast")
    train.epochs, train.save_every = 3.0, 0
    board = JobBoard()
    job = board.wait(start_training(board, manager, RunRequest(dataset, SYSTEM, LoraSettings(), train,
                                                               new_run_dir(work / "runs", "facts"))), 600)
    out = {"small_model_final_loss": (folder / "final_loss.txt").read_text(), "training_status": job.status.value}
    out["base"] = compare_decoders(manager, None, args.tokens)
    if job.status is JobStatus.DONE:
        out["adapter"] = compare_decoders(manager, job.result["adapter"], args.tokens)
    out["decoder_kernels"] = getattr(manager.require_loaded().decoder, "cuda_kernels_note", "")
    out["adapter_updates"] = adapter_updates(manager.require_loaded().decoder)
    out["graphs_equal_generate"] = all(r["graph_equals_generate"] for part in ("base", "adapter")
                                       for r in out.get(part, []))
    out["decoder_problem"] = manager.require_loaded().decoder.problem
    print(json.dumps(out, ensure_ascii=False), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny models")
    parser.add_argument("--model-dir", default="/tmp/qwen25-7b-random")
    parser.add_argument("--small-dir", default="/tmp/qwen2-small-trained")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--part", choices=("repeatable", "graphs-equal-eager", "both"), default="both")
    args = parser.parse_args()
    if args.tiny:
        args.tokens = min(args.tokens, 16)
    payload: dict = {"times_asked": TIMES, "new_tokens": args.tokens}
    name = "decode_repeatability-tiny" if args.tiny else "decode_repeatability"
    try:
        if args.part in ("repeatable", "both"):
            payload["repeatable"] = part_repeatable(args)
            write_results(name, payload)
        if args.part in ("graphs-equal-eager", "both"):
            payload["graphs_equal_eager"] = part_graphs_equal_eager(args)
    finally:
        print("->", write_results(name, payload), flush=True)


if __name__ == "__main__":
    main()
