"""``tunelab board``: a local Gradio app over a runs directory (runs, live curves, compare, chat,
predict, launch). Every view is built from the readers in this package, which never write into a run.

Every run name that comes from the page is resolved with :func:`tunelab.board.runs.inside`, so a path
outside RUNS_DIR (``..``, an absolute path, a symlink out) is refused, whatever the browser sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

from tunelab.board import compare, runs, talk
from tunelab.board.launch import Launcher, local_configs, shipped_configs
from tunelab.errors import TunelabError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
RUN_COLUMNS = ["name", "task", "base_model", "method", "status", "steps", "wall_s", "best_metric", "best"]
RUN_HEADERS = ["run", "task", "base model", "method", "status", "steps", "wall time", "held-out metric", "best (@ step)"]


def _gradio():
    """Gradio, imported with its usage analytics off (a local board reports nothing anywhere)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio

    return gradio


def _user_errors(fn: Callable) -> Callable:
    """Show a :class:`TunelabError` as the page's error message (no traceback)."""
    import inspect

    gr = _gradio()

    if inspect.isgeneratorfunction(fn):
        @wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except TunelabError as err:
                raise gr.Error(str(err)) from None
        return generator

    @wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TunelabError as err:
            raise gr.Error(str(err)) from None
    return call


class Board:
    """The state behind one board: its runs directory, the metrics followers and the launcher."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir.resolve()
        self.follower = runs.MetricsFollower()
        self.launcher = Launcher(self.runs_dir)

    def run_dir(self, name: str) -> Path:
        """The run ``name`` (relative to RUNS_DIR); refused outside it or when it is no run."""
        if not name:
            raise TunelabError("pick a run first")
        path = runs.inside(self.runs_dir, name)
        if not ((path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()):
            raise TunelabError(f"{name}: no run there (no config.yaml or metrics.jsonl)")
        return path

    def names(self) -> list[str]:
        return [str(p.relative_to(self.runs_dir)) for p in runs.find_runs(self.runs_dir)]

    def table(self) -> list[list[str]]:
        rows = [runs.summarize(p, self.runs_dir).row() for p in runs.find_runs(self.runs_dir)]
        return [[str(r[c] if r[c] is not None else "") for c in RUN_COLUMNS] for r in rows]

    def names_of(self, want: Callable[[Path], bool]) -> list[str]:
        return [n for n in self.names() if want(self.runs_dir / n)]

    def live(self, name: str, metrics: list[str]):
        """The live plot's frame and a status line: how many points, the last step, the run's status."""
        path = self.run_dir(name)
        records = self.follower.records(path)
        metrics = metrics or [m for m in ("loss",) if m in compare.metric_names(records)]
        frame = compare.curve_frame({name: records}, metrics)
        last = max((int(r["step"]) for r in records if "step" in r), default=0)
        status = f"**{name}**: {runs.run_status(path)}, {len(frame)} points, last step {last}"
        return frame, status, records

    def compare(self, names: list[str], metric: str):
        if len(names) < 1:
            raise TunelabError("pick two or more runs to compare")
        paths = {n: self.run_dir(n) for n in names}
        frame = compare.curve_frame({n: self.follower.records(p) for n, p in paths.items()}, [metric or "loss"])
        diff = compare.config_diff({n: runs.read_config(p) for n, p in paths.items()})
        results = {n: compare.run_results(p) for n, p in paths.items()}
        return frame, diff, compare.held_out_table(results), compare.samples_table(results)


def _is_chat_run(path: Path) -> bool:
    info = compare.run_results(path)
    return (path / "tunelab.json").is_file() and "label_space" not in info and \
        runs.read_config(path).get("task") in ("sft", "dpo", "ppo", "grpo")


def _is_classifier_run(path: Path) -> bool:
    return (path / "tunelab.json").is_file() and runs.read_config(path).get("task") == "classification"


def build_board(runs_dir: Path, refresh_s: float = 2.0):
    """The Gradio app (a ``gr.Blocks``) over ``runs_dir``; ``refresh_s`` = seconds between live updates."""
    gr = _gradio()

    board = Board(runs_dir)
    with gr.Blocks(title="tunelab board") as demo:
        demo.board = board  # for tests and shutdown
        gr.Markdown(f"# tunelab board\nRuns under `{board.runs_dir}`")
        with gr.Tab("Runs", id="runs"):
            runs_table = gr.Dataframe(headers=RUN_HEADERS, value=board.table, interactive=False, elem_id="runs-table",
                                      wrap=True)
            gr.Button("Refresh", elem_id="runs-refresh").click(board.table, outputs=runs_table)
        _live_tab(gr, board, refresh_s)
        _compare_tab(gr, board)
        _chat_tab(gr, board)
        _predict_tab(gr, board)
        _launch_tab(gr, board, refresh_s)
        gr.Timer(refresh_s * 2).tick(board.table, outputs=runs_table, show_progress="hidden")
    return demo


def _plot(gr, elem_id: str, color: str, title: str):
    return gr.LinePlot(x="step", y="value", color=color, title=title, elem_id=elem_id, height=320,
                       x_title="step", y_title="value")


def _live_tab(gr, board: Board, refresh_s: float) -> None:
    with gr.Tab("Live curves", id="live") as tab:
        with gr.Row():
            run = gr.Dropdown(choices=board.names(), label="run", elem_id="live-run", allow_custom_value=True)
            metrics = gr.Dropdown(choices=[], value=[], multiselect=True, label="metrics", elem_id="live-metrics")
            follow = gr.Checkbox(value=True, label="follow (re-read metrics.jsonl as it grows)")
        status = gr.Markdown(elem_id="live-status")
        plot = _plot(gr, "live-plot", "metric", "live curves")

        @_user_errors
        def pick(name):
            if not name:
                return gr.update(), None, ""
            frame, text, records = board.live(name, [])
            names = compare.metric_names(records)
            chosen = [m for m in ("loss", "eval/loss") if m in names] or names[:1]
            frame, text, _ = board.live(name, chosen)
            return gr.update(choices=names, value=chosen), frame, text

        @_user_errors
        def update(name, chosen, on):
            if not name or not on:
                return gr.update(), gr.update()
            frame, text, _ = board.live(name, chosen)
            return frame, text

        run.change(pick, inputs=run, outputs=[metrics, plot, status])
        metrics.change(update, inputs=[run, metrics, follow], outputs=[plot, status])
        gr.Timer(refresh_s).tick(update, inputs=[run, metrics, follow], outputs=[plot, status], show_progress="hidden")
        tab.select(lambda: gr.update(choices=board.names()), outputs=run)


def _compare_tab(gr, board: Board) -> None:
    with gr.Tab("Compare", id="compare") as tab:
        with gr.Row():
            chosen = gr.Dropdown(choices=board.names(), multiselect=True, label="runs", elem_id="compare-runs")
            metric = gr.Dropdown(choices=list(compare.MAIN_METRICS), value="loss", label="metric",
                                 allow_custom_value=True, elem_id="compare-metric")
            go = gr.Button("Compare", elem_id="compare-go")
        plot = _plot(gr, "compare-plot", "run", "overlaid curves")
        gr.Markdown("### Config diff (keys whose values differ)")
        diff = gr.Dataframe(interactive=False, elem_id="compare-diff", wrap=True)
        gr.Markdown("### Held-out metrics before → after")
        held_out = gr.Dataframe(interactive=False, elem_id="compare-held-out")
        gr.Markdown("### Sample answers side by side")
        samples = gr.Dataframe(interactive=False, elem_id="compare-samples", wrap=True)

        @_user_errors
        def run_compare(names, metric_name):
            frame, rows, table, answers = board.compare(names or [], metric_name)
            heads = ["key", *names]
            held = ["metric", *[f"{n} {w}" for n in names for w in ("before", "after")]]
            return (frame, gr.update(value=rows or [["(no differences)"] + [""] * len(names)], headers=heads),
                    gr.update(value=table or [[""] * len(held)], headers=held),
                    gr.update(value=answers or [[""] * (len(names) + 2)],
                              headers=["prompt", "starting model", *names]))

        go.click(run_compare, inputs=[chosen, metric], outputs=[plot, diff, held_out, samples])

        @_user_errors
        def metrics_of(names, current):
            found = compare.metric_names([r for n in names or [] for r in board.follower.records(board.run_dir(n))])
            return gr.update(choices=found or list(compare.MAIN_METRICS), value=current if current in found else
                             (found[0] if found else current))

        chosen.change(metrics_of, inputs=[chosen, metric], outputs=metric)
        tab.select(lambda: gr.update(choices=board.names()), outputs=chosen)


def _chat_tab(gr, board: Board) -> None:
    with gr.Tab("Chat", id="chat") as tab:
        with gr.Row():
            run = gr.Dropdown(choices=board.names_of(_is_chat_run), label="finished SFT/DPO/PPO/GRPO run",
                              elem_id="chat-run", allow_custom_value=True)
            max_new = gr.Slider(8, 512, value=128, step=8, label="max new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
        system = gr.Textbox(label="system message (optional)")
        chatbot = gr.Chatbot(elem_id="chat-box", height=360)
        message = gr.Textbox(label="message", elem_id="chat-input", placeholder="Type and press Enter")

        @_user_errors
        def respond(name, text, history, system_text, budget, temp) -> Iterator[tuple[Any, str]]:
            path = board.run_dir(name)
            history = list(history or []) + [{"role": "user", "content": text}]
            turns = [{"role": m["role"], "content": _text_of(m["content"])} for m in history]
            history.append({"role": "assistant", "content": ""})
            yield history, ""
            for partial in talk.stream_reply(path, turns, system=system_text, max_new_tokens=int(budget),
                                             temperature=float(temp)):
                history[-1] = {"role": "assistant", "content": partial}
                yield history, ""

        message.submit(respond, inputs=[run, message, chatbot, system, max_new, temperature],
                       outputs=[chatbot, message])
        gr.Button("Clear").click(lambda: [], outputs=chatbot)
        tab.select(lambda: gr.update(choices=board.names_of(_is_chat_run)), outputs=run)


def _text_of(content: Any) -> str:
    """A Chatbot message's text (Gradio may hand content back as a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def _predict_tab(gr, board: Board) -> None:
    with gr.Tab("Predict", id="predict") as tab:
        run = gr.Dropdown(choices=board.names_of(_is_classifier_run), label="finished classification run",
                          elem_id="predict-run", allow_custom_value=True)
        text = gr.Textbox(label="text", lines=3, elem_id="predict-text")
        pair = gr.Textbox(label="second text (pair classifiers only)")
        label = gr.Label(label="labels with probabilities", elem_id="predict-label")
        raw = gr.JSON(label="prediction")

        @_user_errors
        def predict(name, body, second):
            answer = talk.predict_text(board.run_dir(name), body, second or None)
            probs = answer.get("probabilities")
            return (probs if probs else {str(answer["prediction"]): 1.0}), answer

        gr.Button("Predict", elem_id="predict-go").click(predict, inputs=[run, text, pair], outputs=[label, raw])
        tab.select(lambda: gr.update(choices=board.names_of(_is_classifier_run)), outputs=run)


def _launch_tab(gr, board: Board, refresh_s: float) -> None:
    with gr.Tab("Launch", id="launch"):
        configs = shipped_configs() + local_configs(board.runs_dir)
        config = gr.Dropdown(choices=configs, label="config (shipped, or a .yaml inside the runs directory)",
                             allow_custom_value=True, elem_id="launch-config")
        with gr.Row():
            name = gr.Textbox(label="run name (directory under the runs directory)", elem_id="launch-name")
            overwrite = gr.Checkbox(value=False, label="--overwrite an earlier run of this name")
        overrides = gr.Textbox(label="overrides (key.path=value ...)", lines=2, elem_id="launch-overrides",
                               placeholder="train.max_steps=20 train.lr=1e-4")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="launch-start")
            stop = gr.Button("Stop (SIGTERM: checkpoint, resumable)", elem_id="launch-stop")
            resume = gr.Button("Resume", elem_id="launch-resume")
        watch = gr.Textbox(label="progress", lines=14, max_lines=30, interactive=False, elem_id="launch-log")
        status = gr.Markdown(elem_id="launch-status")

        def describe(run_name):
            if not run_name:
                return gr.update(), ""
            key = run_name.strip()
            try:
                state = runs.run_status(runs.inside(board.runs_dir, key))
            except TunelabError:
                state = "?"
            return board.launcher.describe(key), f"**{key}**: {state}"

        @_user_errors
        def start_run(cfg, run_name, extra, replace):
            launch = board.launcher.start(cfg or "", run_name or "", extra or "", overwrite=bool(replace))
            return describe(launch.name)

        @_user_errors
        def resume_run(cfg, run_name, extra):
            launch = board.launcher.start(cfg or "", run_name or "", extra or "", resume=True)
            return describe(launch.name)

        @_user_errors
        def stop_run(run_name):
            message = board.launcher.stop(run_name or "")
            log, state = describe(run_name)
            return log, state + f"  \n{message}"

        start.click(start_run, inputs=[config, name, overrides, overwrite], outputs=[watch, status])
        resume.click(resume_run, inputs=[config, name, overrides], outputs=[watch, status])
        stop.click(stop_run, inputs=name, outputs=[watch, status])
        gr.Timer(refresh_s).tick(describe, inputs=name, outputs=[watch, status], show_progress="hidden")


def serve(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, refresh_s: float = 2.0):
    """Serve the board; returns the running ``gr.Blocks`` when ``block`` is False (tests). ``refresh_s``:
    seconds between live updates of the curves, the runs table and a launch's progress.

    Raises:
        TunelabError: ``runs_dir`` is not a directory.
    """
    if not runs_dir.is_dir():
        raise TunelabError(f"{runs_dir}: not a directory (tunelab board RUNS_DIR)")
    demo = build_board(runs_dir, refresh_s)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                inbrowser=False, quiet=not block)
    return demo
