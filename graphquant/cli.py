"""The ``graphquant`` command: ``graphquant SUBCOMMAND ARGS [--flags]``.

    graphquant optimize IN.pb -o OUT.pb [--inputs a,b] [--outputs x:0,y:0] [--debug]
    graphquant inspect IN.pb [--inputs ...] [--outputs ...]
    graphquant convert IN.pb -o OUT.pb --calib DATA [--report FILE.md|.html|.json]
                       [--saved_model DIR] [--calibration=kl] [--measure_speed]
                       [--fidelity top1=0.99 --validation DATA] ...

The first argument names the subcommand; flags (absl) are defined once below
and each subcommand lists the ones it takes.  A new subcommand is one function
``_cmd_NAME(args) -> int`` plus one :class:`Command` entry in ``COMMANDS``.

Any :class:`GraphQuantError` ends the run with its problem and fix on stderr
and exit code 2 (no traceback, and no output file written).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from absl import flags

import graphquant
from graphquant.errors import GraphQuantError

PROG = "graphquant"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 2, 2

# --------------------------------------------------------------------------- flags
# One FlagValues of our own, so importing graphquant.cli never touches absl's global FLAGS.
FLAGS = flags.FlagValues()
flags.DEFINE_string("output", None, "Path of the graph to write (.pb binary, .pbtxt text).",
                    short_name="o", flag_values=FLAGS)
flags.DEFINE_list("inputs", None, "Comma-separated input node names "
                  "(default: the graph's Placeholders).", flag_values=FLAGS)
flags.DEFINE_list("outputs", None, "Comma-separated output tensor names, e.g. logits:0 "
                  "(default: nodes nobody reads).", flag_values=FLAGS)
flags.DEFINE_list("passes", None, "Comma-separated pass names to run instead of the "
                  "clean-up pipeline (see `graphquant passes`).", flag_values=FLAGS)
flags.DEFINE_bool("debug", False, "Validate the graph after every pass and print each "
                  "pass with its time.", flag_values=FLAGS)
flags.DEFINE_bool("all", False, "List every int8 candidate, not only the first 20.",
                  flag_values=FLAGS)
# graphquant convert
flags.DEFINE_string("calib", None, "Calibration data: a .npy (one input, first axis = samples), "
                    "a .npz (one array per input name) or a folder of images (with "
                    "--image_spec).", flag_values=FLAGS)
flags.DEFINE_enum("calibration", "auto", ["auto", "minmax", "kl", "percentile", "mse"],
                  "How each tensor's range is chosen from the calibration data (auto: per "
                  "tensor the data range or the clipped range of least expected error).",
                  flag_values=FLAGS)
flags.DEFINE_float("percentile", None, "--calibration=percentile: share of values kept in "
                   "range (default 99.99).", flag_values=FLAGS)
flags.DEFINE_bool("per_tensor", False, "One weight scale per tensor instead of per output "
                  "channel.", flag_values=FLAGS)
flags.DEFINE_enum("target", "auto", ["auto", "avx2", "vnni"], "CPU the int8 graph is for "
                  "(auto: this one); avx2 limits weights to 7 bits so sums cannot saturate.",
                  flag_values=FLAGS)
flags.DEFINE_list("exclude", None, "Node names or op types to keep in fp32, comma-separated.",
                  flag_values=FLAGS)
flags.DEFINE_string("image_spec", None, "Preprocessing of calibration images, e.g. "
                    "'preset=tf' or 'size=224,224;mean=127.5;scale=1/127.5' "
                    "(graphquant.calib_data.ImageSpec).",
                    flag_values=FLAGS)
flags.DEFINE_integer("calib_limit", None, "Use at most this many calibration samples.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("max_layer_error", "0.2", "Keep an int8 layer in fp32 when its own "
                    "relative L2 error on the calibration data is above this; 'none' keeps "
                    "every layer int8.", flag_values=FLAGS)
flags.DEFINE_bool("pair_weights", True, "avx2 target: 8-bit weights limited per input-channel "
                  "pair so 16-bit sums cannot saturate (--nopair_weights: 7-bit weights).",
                  flag_values=FLAGS)
flags.DEFINE_bool("shift_signed", True, "Store signed activations read by convs/matmuls as "
                  "quint8 of (x - min): 255 steps instead of 127.", flag_values=FLAGS)
flags.DEFINE_bool("bias_correction", True, "Correct each layer's per-channel output mean "
                  "shift caused by weight rounding, from the calibration data.",
                  flag_values=FLAGS)
flags.DEFINE_bool("equalize", False, "Cross-layer weight equalization of conv -> conv chains "
                  "before quantizing (where it lowers the expected error).", flag_values=FLAGS)
flags.DEFINE_string("fidelity", None, "Accuracy target, e.g. top1=0.99 or rel_l2=0.02: keep "
                    "in fp32 the layers whose fallback helps most per multiply-add until the int8 "
                    "graph meets it on --validation data (at most 5 + log2(layers) evaluations).",
                    flag_values=FLAGS)
flags.DEFINE_string("validation", None, "Data for --fidelity (same forms as --calib; "
                    "default: the calibration data).", flag_values=FLAGS)
flags.DEFINE_string("report", None, "Write the conversion report here: .md, .html or .json.",
                    flag_values=FLAGS)
flags.DEFINE_string("saved_model", None, "Also write the int8 graph as a SavedModel with a "
                    "serving signature in this (new or empty) directory.", flag_values=FLAGS)
flags.DEFINE_bool("measure_speed", False, "Time fp32 vs int8 on one calibration feed "
                  "(a quick estimate, in the report and summary).", flag_values=FLAGS)


@dataclass
class Command:
    usage: str                     # the positional arguments, for the usage line
    summary: str                   # one line for `graphquant --help`
    flags: Sequence[str]           # the flag names this subcommand takes
    run: Callable[[List[str]], int]
    n_args: int = 1                # number of positional arguments


def _cmd_optimize(args: List[str]) -> int:
    from graphquant import api
    from graphquant.graph import op_histogram
    from graphquant.graph_io import check_output_path, load_graph_def, save_graph_def

    src, out = args[0], FLAGS.output
    check_output_path(out, src)  # before any work: a bad -o fails fast
    graph_def = load_graph_def(src)
    started = time.perf_counter()
    progress = _pass_timer() if FLAGS.debug else None
    optimized, ctx = api.optimize(graph_def, FLAGS.inputs, FLAGS.outputs, passes=FLAGS.passes,
                                  debug=FLAGS.debug, progress=progress)
    if progress:
        progress(None)
    elapsed = time.perf_counter() - started
    save_graph_def(optimized, out, input_path=src)
    print(f"optimized {src} -> {out} in {elapsed:.2f} s")
    print(f"  inputs:  {', '.join(ctx.inputs) or '(none)'}")
    print(f"  outputs: {', '.join(ctx.outputs) or '(none)'}")
    print(f"  nodes:   {len(graph_def.node)} -> {len(optimized.node)}")
    _print_histograms(op_histogram(graph_def), op_histogram(optimized))
    _print_notes(ctx.notes)
    return EXIT_OK


def _cmd_inspect(args: List[str]) -> int:
    from graphquant.inspect import inspect_graph

    src = args[0]
    report = inspect_graph(src, FLAGS.inputs, FLAGS.outputs, passes=FLAGS.passes)
    print(f"{src}")
    for title, specs in (("inputs", report.inputs), ("outputs", report.outputs)):
        print(f"  {title}:")
        for spec in specs:
            print(f"    {spec.name:<40} {spec.dtype:<8} {spec.shape_str}")
    print(f"  nodes: {sum(report.histogram.values())} "
          f"({sum(report.optimized_histogram.values())} after `graphquant optimize`)")
    _print_histograms(report.histogram, report.optimized_histogram, after_title="optimized")
    counts = report.candidate_counts()
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"
    print(f"  int8 candidates (on the optimized graph): {summary}")
    shown = report.candidates if FLAGS.all else report.candidates[:20]
    for c in shown:
        flag = "" if c.int8_inputs else "   (int8 only if its inputs become int8)"
        print(f"    {c.kind:<15} {c.fused:<36} {c.root}{flag}")
    if len(shown) < len(report.candidates):
        print(f"    ... {len(report.candidates) - len(shown)} more (--all lists them)")
    if report.fp32:
        print("  conv/matmul staying fp32:")
        for node in report.fp32:
            print(f"    {node.op:<22} {node.name}: {node.reason}")
    _print_notes(report.notes)
    return EXIT_OK


def _cmd_convert(args: List[str]) -> int:
    from graphquant.calibrate import stderr_progress
    from graphquant.convert import convert
    from graphquant.graph_io import load_graph_def

    src, out = args[0], FLAGS.output
    report_path, saved_model = FLAGS.report, FLAGS.saved_model
    _check_convert_paths(src, out, report_path, saved_model)  # before any work
    if not FLAGS.calib:
        raise UsageError("`graphquant convert` needs calibration data: --calib DATA",
                         "give --calib samples.npy (one input), samples.npz (one array per "
                         "input) or a folder of images with --image_spec")
    max_error = _max_layer_error(FLAGS.max_layer_error)
    started = time.perf_counter()
    result = convert(src, FLAGS.calib, inputs=FLAGS.inputs, outputs=FLAGS.outputs,
                     calibration=FLAGS.calibration, per_tensor=FLAGS.per_tensor,
                     target=FLAGS.target, exclude=FLAGS.exclude or (),
                     image_spec=FLAGS.image_spec, calib_limit=FLAGS.calib_limit,
                     percentile=FLAGS.percentile, max_layer_error=max_error,
                     progress=stderr_progress, debug=FLAGS.debug,
                     histograms=True if report_path else None,
                     pair_weights=FLAGS.pair_weights, shift_signed=FLAGS.shift_signed,
                     bias_correction=FLAGS.bias_correction, equalize=FLAGS.equalize,
                     fidelity=FLAGS.fidelity, validation=FLAGS.validation)
    elapsed = time.perf_counter() - started
    report = result.report
    report.files = {"input file": src, "output file": out}
    if saved_model:
        report.files["SavedModel"] = saved_model
    if FLAGS.measure_speed:
        report.speed = _quick_speed(load_graph_def(src, validate=False), result.graph_def,
                                    report)
    _write_outputs(result.graph_def, report, src, out, report_path, saved_model)
    print(f"converted {src} -> {out} in {elapsed:.1f} s")
    print(report.summary())
    for label, path in (("report", report_path), ("SavedModel", saved_model)):
        if path:
            print(f"  {label}: {path}")
    return EXIT_OK


def _check_convert_paths(src: str, out: Optional[str], report: Optional[str],
                         saved_model: Optional[str]) -> None:
    """Every output path checked before any work (and no two of them the same)."""
    from graphquant.graph_io import check_output_path
    from graphquant.report_render import report_format
    from graphquant.saved_model import check_saved_model_path

    check_output_path(out, src)
    if report:
        report_format(report)
        check_output_path(report, src)
        if os.path.abspath(report) == os.path.abspath(out):
            raise UsageError(f"--report '{report}' is the same path as -o",
                             "give the report its own file, e.g. --report report.html")
    if saved_model:
        check_saved_model_path(saved_model, src, out, report)


def _max_layer_error(text: str) -> Optional[float]:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UsageError(f"--max_layer_error must be a positive number or 'none', got '{text}'",
                         "e.g. --max_layer_error=0.2 (20% relative error), or 'none'")
    return value


def _quick_speed(fp32, int8, report) -> Dict[str, object]:
    """One calibration feed, both graphs timed in interleaved rounds (graphquant.speed)."""
    from graphquant.calib_data import open_data
    from graphquant.speed import quick_speedup

    data = open_data(FLAGS.calib, fp32, inputs=report.inputs, image_spec=FLAGS.image_spec,
                     limit=FLAGS.calib_limit)
    feeds = next(iter(data))
    print("measuring speed (quick estimate) ...", file=sys.stderr)
    try:
        return quick_speedup(fp32, int8, feeds, report.outputs)
    except GraphQuantError as err:  # the conversion stands; the report says why
        return {"error": err.problem}


def _write_outputs(int8, report, src: str, out: str, report_path: Optional[str],
                   saved_model: Optional[str]) -> None:
    """SavedModel first (the step most likely to fail), then the graph and the report,
    each written atomically; if a later one fails, the earlier ones are removed."""
    from graphquant.graph_io import save_graph_def
    from graphquant.saved_model import write_saved_model

    written: List[str] = []
    try:
        if saved_model:
            write_saved_model(int8, saved_model, report.inputs, report.outputs)
            written.append(saved_model)
        save_graph_def(int8, out, input_path=src)
        written.append(out)
        if report_path:
            report.write(report_path)
    except BaseException:
        import shutil

        for path in written:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)
        raise


def _cmd_passes(args: List[str]) -> int:
    from graphquant.pipeline import CLEANUP_PIPELINE, registered_passes

    print("clean-up pipeline (graphquant optimize): " + " ".join(CLEANUP_PIPELINE))
    print("registered passes:")
    for name in registered_passes():
        print(f"  {name}")
    return EXIT_OK


COMMANDS: Dict[str, Command] = {
    "optimize": Command("IN -o OUT", "fp32 clean-up: strip debug ops, fold constants, "
                        "batch-norm and pads; write the result",
                        ("output", "inputs", "outputs", "passes", "debug"), _cmd_optimize),
    "inspect": Command("IN", "show inputs, outputs, op histogram and the nodes int8 would take",
                       ("inputs", "outputs", "passes", "all"), _cmd_inspect),
    "passes": Command("", "list the clean-up pipeline and every registered pass", (),
                      _cmd_passes, n_args=0),
    "convert": Command("IN -o OUT --calib DATA", "int8: clean up, calibrate on DATA, quantize; "
                       "write the int8 graph, a report and a SavedModel if asked",
                       ("output", "calib", "inputs", "outputs", "calibration", "percentile",
                        "per_tensor", "target", "exclude", "image_spec", "calib_limit",
                        "max_layer_error", "pair_weights", "shift_signed", "bias_correction",
                        "equalize", "fidelity", "validation", "report", "saved_model",
                        "measure_speed", "debug"),
                       _cmd_convert),
}


# --------------------------------------------------------------------------- output helpers
def _print_histograms(before: Dict[str, int], after: Dict[str, int],
                      after_title: str = "after") -> None:
    ops = sorted(set(before) | set(after), key=lambda op: (-before.get(op, 0),
                                                           -after.get(op, 0), op))
    width = max([len(op) for op in ops] + [2])
    print(f"  {'op':<{width}}  {'before':>7}  {after_title:>9}")
    for op in ops:
        b, a = before.get(op, 0), after.get(op, 0)
        mark = "" if a == b else ("  -" if a < b else "  +")
        print(f"  {op:<{width}}  {b:>7}  {a:>9}{mark}")


def _print_notes(notes: List[Dict[str, str]]) -> None:
    if not notes:
        return
    print(f"  notes ({len(notes)}):")
    for note in notes:
        print(f"    {note['pass']}: {note['node']}: {note['message']}")


def _pass_timer():
    """A progress callback printing each pass and how long the previous one took."""
    state = {"name": None, "t": 0.0}

    def progress(name: Optional[str]) -> None:
        now = time.perf_counter()
        if state["name"] is not None:
            print(f"  pass {state['name']:<32} {now - state['t']:.3f} s", file=sys.stderr)
        state["name"], state["t"] = name, now

    return progress


# --------------------------------------------------------------------------- help and parsing
def _import_tensorflow(quiet: bool) -> None:
    """Import TensorFlow (a clear GraphQuantError when it is missing or too old).

    ``quiet`` keeps its C++ start-up lines (CUDA, oneDNN banners) off stderr:
    they are printed before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so only
    silencing file descriptor 2 during the import hides them; listing the
    devices here also hides the "failed call to cuInit" line of machines
    without a GPU.  --debug shows them all.
    """
    from graphquant.runtime import tf

    if not quiet or "tensorflow" in sys.modules:
        tf()
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        tf().config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _main_help() -> str:
    lines = [f"usage: {PROG} SUBCOMMAND ARGS [--flags]", "",
             "Offline INT8 quantization of frozen TensorFlow graphs "
             f"(graphquant {graphquant.__version__}).", "", "subcommands:"]
    for name, cmd in COMMANDS.items():
        lines.append(f"  {name:<10} {cmd.summary}")
    lines += ["", f"`{PROG} SUBCOMMAND --help` lists a subcommand's flags."]
    return "\n".join(lines)


def _command_help(name: str) -> str:
    cmd = COMMANDS[name]
    lines = [f"usage: {PROG} {name} {cmd.usage}".rstrip() + (" [--flags]" if cmd.flags else ""),
             "", cmd.summary + "."]
    if cmd.flags:
        lines += ["", "flags:"]
    for flag_name in cmd.flags:
        flag = FLAGS[flag_name]
        spelling = f"-{flag.short_name}, --{flag.name}" if flag.short_name else f"--{flag.name}"
        if flag.boolean:
            spelling = f"--[no]{flag.name}"
        elif flag_name in ("output",):
            spelling += " PATH"
        elif isinstance(flag, flags.EnumFlag):
            spelling += "=" + "|".join(flag.parser.enum_values)
        elif isinstance(flag.parser, flags.ListParser):
            spelling += "=a,b"
        else:
            spelling += "=" + {"calib": "DATA", "validation": "DATA", "report": "FILE",
                                 "saved_model": "DIR", "fidelity": "TARGET"}.get(
                flag_name, "N" if flag.flag_type() in ("int", "float") else "VALUE")
        help_text = flag.help.split(">: ", 1)[-1] if isinstance(flag, flags.EnumFlag) else flag.help
        if flag.default is not None and not flag.boolean and not isinstance(flag.default, list):
            help_text += f" (default: {flag.default})"
        lines.append(f"  {spelling:<22} {help_text}")
    return "\n".join(lines)


class UsageError(GraphQuantError):
    """The command line itself is wrong (unknown subcommand or flag, missing argument)."""


def _parse(name: str, argv: List[str]) -> List[str]:
    cmd = COMMANDS[name]
    FLAGS.unparse_flags()
    try:
        args = FLAGS([f"{PROG} {name}"] + argv)[1:]
    except flags.Error as exc:
        raise UsageError(str(exc), f"see `{PROG} {name} --help`") from None
    given = {FLAGS[f].name for f in FLAGS if FLAGS[f].present}
    extra = sorted(given - set(cmd.flags))
    if extra:
        raise UsageError(f"`{PROG} {name}` does not take --{', --'.join(extra)}",
                         f"see `{PROG} {name} --help`")
    if len(args) != cmd.n_args:
        raise UsageError(f"`{PROG} {name}` takes {cmd.n_args} positional argument(s) "
                         f"({cmd.usage or 'none'}), got {len(args)}: {' '.join(args) or '(none)'}",
                         f"usage: {PROG} {name} {cmd.usage}".rstrip())
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (without the program name); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_main_help())
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(f"{PROG} {graphquant.__version__}")
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    try:
        if name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, COMMANDS, n=1)
            raise UsageError(f"unknown subcommand '{name}'",
                             (f"did you mean `{PROG} {close[0]}`? " if close else "")
                             + f"subcommands: {', '.join(COMMANDS)}")
        if "-h" in rest or "--help" in rest or "-help" in rest:
            print(_command_help(name))
            return EXIT_OK
        args = _parse(name, rest)
        _import_tensorflow(quiet=not FLAGS.debug)
        return COMMANDS[name].run(args)
    except GraphQuantError as err:
        print(f"{PROG}: error: {err.problem}", file=sys.stderr)
        if err.fix:
            print(f"  fix: {err.fix}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point (setup.py: graphquant=graphquant.cli:run)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
