"""The `mlc-engine` command line: convert, compile, generate, chat and bench."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mlc_engine.bench.command import bench_command
from mlc_engine.common.device import Device, parse_device
from mlc_engine.common.errors import MLCEngineError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True, soft_wrap=True)

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model folder path, or a name with quantization (e.g. SmolLM2-135M-Instruct-q4f32_1) "
        "searched in $MLC_ENGINE_HOME, ./dist and the user cache. Default: SmolLM2-135M-Instruct.",
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="cpu, cuda[:N], vulkan[:N], metal, rocm, opencl or auto.")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option("--num-threads", min=1, help="CPU threads for the model (default: all cores)."),
]
LibOption = Annotated[
    Path | None, typer.Option("--lib-path", help="Use this model library instead of compiling.")
]


def _device(text: str) -> Device:
    from mlc_engine.common.device import resolve_device

    return resolve_device(parse_device(text))


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


StepMsOption = Annotated[
    float,
    typer.Option(
        "--max-step-ms",
        min=0.0,
        help="Time a step with running decodes aims for; the prefill beside them is sized to "
        "fit (0: no limit).",
    ),
]
PrefixCacheOption = Annotated[
    bool,
    typer.Option(
        "--prefix-cache/--no-prefix-cache",
        help="Reuse the KV of running and finished requests for prompts that start the same.",
    ),
]


def _prepare(
    model: str | None, devices: list[Device], lib_path: Path | None
) -> tuple[Path, list[Path]]:
    """Resolve the model folder (converting the default model on first use) and its library
    for each device (compiling what is not cached), with progress bars."""
    from mlc_engine.engine.models import prepare_library, prepare_model

    with _progress() as bar:
        tasks: dict[str, TaskID] = {}

        def show(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total or None)
            bar.advance(tasks[what], done)

        folder = prepare_model(model, devices[0], show)
        start = time.perf_counter()
        libraries = [prepare_library(folder, device, lib_path, show) for device in devices]
    if "compiling: generating machine code" in tasks:
        console.print(f"compiled {libraries[-1].name} in {time.perf_counter() - start:.1f} s")
    return folder, libraries


def _load(  # noqa: ANN202
    model: str | None, device_text: str, lib_path: Path | None, num_threads: int | None
):
    """Resolve, convert and compile as needed; returns (runtime, tokenizer, chat template)."""
    from mlc_engine.common.device import tvm_device
    from mlc_engine.engine.runtime import ModelRuntime
    from mlc_engine.frontend.text import ChatTemplate, Tokenizer

    device = _device(device_text)
    folder, (lib,) = _prepare(model, [device], lib_path)
    runtime = ModelRuntime(lib, folder, tvm_device(device), num_threads)
    tokenizer = Tokenizer.from_folder(folder, runtime.config)
    return runtime, tokenizer, ChatTemplate.from_config(runtime.config, tokenizer)


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}")
    return typer.Exit(code=2)


@app.command("convert")
def convert_command(
    source: Annotated[Path, typer.Argument(help="A .gguf file or a Hugging Face model folder.")],
    quantization: Annotated[
        str, typer.Option("--quantization", help="q0f32, q0f16, q4f32_1, q4f16_1, q4f32_m, q4f16_m")
    ] = "q4f32_1",
    output: Annotated[Path | None, typer.Option("--output", help="Model folder to write.")] = None,
) -> None:
    """Convert weights (GGUF or safetensors) into an MLC model folder."""
    from mlc_engine.engine.convert import convert

    output = output or Path("dist") / f"{source.stem}-{quantization}"
    try:
        with _progress() as bar:
            task = bar.add_task(f"converting {source.name}", total=None)
            config = convert(
                source,
                quantization,
                output,
                on_tensor=lambda name, total: bar.update(task, total=total, advance=1),
            )
    except (ValueError, OSError) as error:
        raise _fail(error) from None
    console.print(f"wrote {output} ({config.model_type}, {config.quantization})")


@app.command("compile")
def compile_command(
    model: Annotated[str, typer.Argument(help="A model folder, or a model name to search for.")],
    device: DeviceOption = "auto",
    output: Annotated[
        Path | None, typer.Option("--output", help="Library path to write (default: the cache).")
    ] = None,
) -> None:
    """Compile a model folder into a model library for a device (cached)."""
    from mlc_engine.common.config import ModelConfig
    from mlc_engine.common.device import tvm_target
    from mlc_engine.common.model_paths import resolve_model
    from mlc_engine.engine.compiler import compile_model
    from mlc_engine.engine.models import prepare_library

    try:
        folder = resolve_model(model)
        # A concrete device need not be present to compile for it; `auto` picks a present one.
        target_device = parse_device(device)
        if target_device.kind == "auto":
            target_device = _device(device)
        if output is None:
            start = time.perf_counter()
            lib = prepare_library(folder, target_device)
            seconds = time.perf_counter() - start
        else:
            config = ModelConfig.load(folder)
            seconds = compile_model(config, tvm_target(target_device), output)
            lib = output
    except (MLCEngineError, ValueError, OSError) as error:
        raise _fail(error) from None
    console.print(f"{lib} ({seconds:.1f} s)")


@app.command("generate")
def generate_command(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: ModelOption = None,
    device: DeviceOption = "auto",
    lib_path: LibOption = None,
    num_threads: ThreadsOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 256,
    raw: Annotated[
        bool, typer.Option("--raw", help="No chat template: continue the text.")
    ] = False,
) -> None:
    """Answer one prompt with greedy decoding, streamed to stdout."""
    from mlc_engine.engine.greedy import GreedySession
    from mlc_engine.frontend.text import IncrementalDetokenizer

    try:
        runtime, tokenizer, template = _load(model, device, lib_path, num_threads)
        text = prompt if raw else template.render([{"role": "user", "content": prompt}])
        ids = tokenizer.encode(text)
        detokenizer = IncrementalDetokenizer(tokenizer)
        start, count = time.perf_counter(), 0
        for token in GreedySession(runtime).generate(ids, max_tokens, tokenizer.eos_token_ids):
            sys.stdout.write(detokenizer.push([token]))
            sys.stdout.flush()
            count += 1
        sys.stdout.write(detokenizer.flush() + "\n")
    except (MLCEngineError, ValueError, OSError) as error:
        raise _fail(error) from None
    seconds = time.perf_counter() - start
    console.print(f"[dim]{len(ids)} prompt + {count} generated tokens in {seconds:.2f} s[/dim]")


@app.command("chat")
def chat_command(
    model: ModelOption = None,
    device: DeviceOption = "auto",
    lib_path: LibOption = None,
    num_threads: ThreadsOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 512,
) -> None:
    """Chat with the model in the terminal (/reset starts over, /exit or Ctrl-D quits)."""
    from mlc_engine.engine.greedy import GreedySession
    from mlc_engine.frontend.text import IncrementalDetokenizer

    try:
        runtime, tokenizer, template = _load(model, device, lib_path, num_threads)
    except (MLCEngineError, ValueError, OSError) as error:
        raise _fail(error) from None
    session = GreedySession(runtime)
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = console.input("[bold green]>>> [/bold green]")
        except (EOFError, KeyboardInterrupt):
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": line})
        # The whole conversation is prefilled again each turn; at this size it costs little.
        session.reset()
        detokenizer = IncrementalDetokenizer(tokenizer)
        reply = ""
        try:
            ids = tokenizer.encode(template.render(messages))
            for token in session.generate(ids, max_tokens, tokenizer.eos_token_ids):
                piece = detokenizer.push([token])
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as error:
            console.print(f"[red]error:[/red] {error}")
            messages.pop()
            continue
        tail = detokenizer.flush()
        sys.stdout.write(tail + "\n")
        messages.append({"role": "assistant", "content": reply + tail})


# The serving benchmark's options live beside it, shared with benchmarks/serving.py.
app.command("bench")(bench_command)


@app.command("engine")
def engine_command(
    input_endpoint: Annotated[
        str,
        typer.Option("--input", help="ZeroMQ endpoint to bind for requests (ipc:// or tcp://)."),
    ],
    output_endpoint: Annotated[
        str, typer.Option("--output", help="ZeroMQ endpoint to bind for outputs (PUB).")
    ],
    model: ModelOption = None,
    device: DeviceOption = "auto",
    lib_path: LibOption = None,
    num_threads: ThreadsOption = None,
    max_num_seqs: Annotated[
        int, typer.Option("--max-num-seqs", min=1, help="Sequences decoded together, at most.")
    ] = 32,
    max_total_tokens: Annotated[
        int,
        typer.Option(
            "--max-total-tokens", min=0, help="KV cache size in tokens (0: a default by model)."
        ),
    ] = 0,
    max_batch_tokens: Annotated[
        int,
        typer.Option("--max-batch-tokens", min=16, help="Tokens computed per step, at most."),
    ] = 512,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", min=0, help="Sequences waiting beyond --max-num-seqs before refusals."
        ),
    ] = 256,
    max_step_ms: StepMsOption = 0.0,
    frontend_lease: Annotated[
        float,
        typer.Option(
            "--frontend-lease",
            min=1.0,
            help="Seconds without a word from a frontend before its requests are aborted.",
        ),
    ] = 30.0,
    prefix_cache: PrefixCacheOption = True,
) -> None:
    """Run one engine process: continuous batching on one device, served over ZeroMQ."""
    import logging

    from mlc_engine.engine.core import EngineConfig
    from mlc_engine.engine.process import run_engine

    logging.basicConfig(level=logging.INFO, format="engine %(levelname)s %(message)s")
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_total_tokens=max_total_tokens,
        max_batch_tokens=max_batch_tokens,
        max_step_ms=max_step_ms,
        max_queue=max_queue,
        frontend_lease=frontend_lease,
        prefix_cache=prefix_cache,
    )
    try:
        run_engine(
            model, _device(device), input_endpoint, output_endpoint, config, lib_path, num_threads
        )
    except (MLCEngineError, ValueError, OSError) as error:
        raise _fail(error) from None


def serve(
    model: str | None = None,
    lib_path: Path | None = None,
    devices: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_style: str = "openai",
    api_key: str | None = None,
    max_queue: int = 256,
    workers: int = 1,
    allowed_origins: list[str] | None = None,
    engine_options: list[str] | None = None,
    tool_call_parser: str | None = None,
) -> None:
    """Prepare the model (convert and compile once, in a child process), then start one engine
    per device and the HTTP frontend; returns when the server is stopped."""
    from mlc_engine.frontend.settings import API_STYLES, ServeSettings
    from mlc_engine.frontend.supervisor import serve as run_server
    from mlc_engine.frontend.tool_parser import PARSERS

    if api_style not in API_STYLES:
        raise MLCEngineError(f"--api-style must be one of {', '.join(API_STYLES)}")
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise MLCEngineError(f"--tool-call-parser must be one of {', '.join(PARSERS)}")
    folder, chosen, libraries = _prepare_in_child(model, devices, lib_path)
    engine_args = [
        ["--model", str(folder), "--device", device, "--lib-path", str(library)]
        + list(engine_options or [])
        for device, library in zip(chosen, libraries, strict=True)
    ]
    settings = ServeSettings(
        model_folder=str(folder),
        model_name=folder.name,
        engines=[],
        api_style=api_style,
        api_key=api_key,
        max_queue=max_queue,
        allowed_origins=list(allowed_origins or []),
        tool_call_parser=tool_call_parser,
        url=f"http://{host}:{port}",
    )
    console.print(
        f"starting {len(chosen)} engine(s) for {folder.name}; listening on {settings.url}"
    )
    console.print(_sampling_line(folder))
    run_server(settings, engine_args, host, port, workers)


def _prepare_in_child(
    model: str | None, devices: str, lib_path: Path | None
) -> tuple[Path, list[str], list[Path]]:
    """`mlc-engine prepare` in a child process: the model folder, each device's name and its
    library. TVM, which resolving devices and compiling load, stays out of this process, which
    goes on to run the HTTP frontend (TVM alone held about 270 MB of its memory)."""
    command = [sys.executable, "-m", "mlc_engine", "prepare", "--device", devices]
    command += ["--model", model] if model else []
    command += ["--lib-path", str(lib_path)] if lib_path else []
    # The child's progress bars and messages go to the shared stderr; its answer to stdout.
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        raise MLCEngineError(f"preparing the model failed (exit code {done.returncode})") from None
    if "error" in answer:
        raise MLCEngineError(answer["error"])
    return Path(answer["folder"]), answer["devices"], [Path(p) for p in answer["libraries"]]


@app.command("prepare", hidden=True)
def prepare_command(
    model: ModelOption = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    lib_path: LibOption = None,
) -> None:
    """For `serve`: resolve the devices, convert and compile as needed, and print the model
    folder, device names and libraries as JSON (or the error)."""
    answer: dict[str, Any]
    try:
        chosen = [_device(text.strip()) for text in device.split(",") if text.strip()]
        if not chosen:
            raise MLCEngineError("--device names no device")
        folder, libraries = _prepare(model, chosen, lib_path)
        answer = {
            "folder": str(folder),
            "devices": [chosen_device.name for chosen_device in chosen],
            "libraries": [str(library) for library in libraries],
        }
    except (MLCEngineError, ValueError, OSError) as error:
        answer = {"error": str(error)}
    sys.stdout.write(json.dumps(answer) + "\n")


def _sampling_line(folder: Path) -> str:
    """What a request that sets no sampling fields gets, and the file that says so."""
    from mlc_engine.common.config import CONFIG_FILE, ModelConfig

    sampling = ModelConfig.load(folder).sampling
    where = folder / CONFIG_FILE
    if not sampling:
        return (
            f"sampling defaults: none in {where}, so temperature 1.0 and no top_p, top_k or "
            "min_p filter (a request's own values win)"
        )
    values = ", ".join(f"{name} {value:g}" for name, value in sampling.items())
    return f"sampling defaults from {where}: {values} (a request's own values win)"


@app.command("serve")
def serve_command(
    model: ModelOption = None,
    lib_path: LibOption = None,
    device: Annotated[
        str, typer.Option("--device", help="Device(s), comma-separated: one engine each.")
    ] = "auto",
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", min=0, help="Requests queued per engine before 429s."),
    ] = 256,
    workers: Annotated[int, typer.Option("--workers", min=1, help="uvicorn workers.")] = 1,
    api_style: Annotated[
        str,
        typer.Option("--api-style", help="openai, or mlc-chat (MLC-Chat 2023's stream format)."),
    ] = "openai",
    allowed_origins: Annotated[
        list[str] | None,
        typer.Option("--allowed-origin", help="Allow cross-origin requests from this origin."),
    ] = None,
    num_threads: ThreadsOption = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1)] = 32,
    max_total_tokens: Annotated[int, typer.Option("--max-total-tokens", min=0)] = 0,
    max_batch_tokens: Annotated[int, typer.Option("--max-batch-tokens", min=16)] = 512,
    max_step_ms: StepMsOption = 0.0,
    prefix_cache: PrefixCacheOption = True,
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            "--tool-call-parser",
            help="hermes or llama3_json (default: the one the chat template's model writes).",
        ),
    ] = None,
) -> None:
    """Serve the model over HTTP: the OpenAI API and MLC-Chat's REST API."""
    options = ["--max-num-seqs", str(max_num_seqs), "--max-total-tokens", str(max_total_tokens)]
    options += ["--max-batch-tokens", str(max_batch_tokens), "--max-queue", str(max_queue)]
    options += ["--max-step-ms", str(max_step_ms)]
    if num_threads:
        options += ["--num-threads", str(num_threads)]
    options.append("--prefix-cache" if prefix_cache else "--no-prefix-cache")
    try:
        serve(
            model, lib_path, device, host, port, api_style, api_key, max_queue, workers,
            allowed_origins, options, tool_call_parser,
        )  # fmt: skip
    except (MLCEngineError, ValueError, OSError) as error:
        raise _fail(error) from None


def main() -> None:
    app()
