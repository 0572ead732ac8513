"""The ensemble as one ONNX graph, the deployment format, and running it with ONNX Runtime on CPU.

The graph takes float32 pixels [N, 1, 48, 48] (grayscale, 0..255, N any) and returns the ensemble's
probabilities [N, classes], the members' softmax outputs averaged with their weights inside the graph.
The class list, the weights, the member names and the TTA the weights were fitted with are in the
model's metadata_props. TTA stays outside the graph: a Predictor makes the views, as it does for torch,
so a caller can choose none, flip or tencrop for the same file.

On a CPU, predict.py, app.py and Predictor.pretrained() run the shipped ensemble as its int8 graph,
weights/ensemble-int8.onnx (export.py --format onnx-int8 writes, scores and records it in ensemble.json),
and other ensembles as their fp32 graph, built on first use and cached under .cache/onnx/
(inference.cached_session); export.py --format onnx writes a scored fp32 copy:

    from ferkit.inference import Predictor
    predictor = Predictor.pretrained()                          # on a CPU: weights/ensemble-int8.onnx
    predictor = Predictor.from_onnx("weights/ensemble.onnx")   # a file, with its own TTA unless tta= is given
    predictor.predict("photo.jpg")

onnx, onnxscript and onnxruntime are imported inside the functions that use them, so that the torch
path (predict.py's default) does not pay for importing them.
"""
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data import IMAGE_SIZE
from ensemble import TTA_CHOICES, Description, classes_problem, is_weight
from ferkit.cli import UsageError
from ferkit.files import write_atomic

FORMAT = "fer-onnx-1"
FP32_NAME, INT8_NAME = "ensemble.onnx", "ensemble-int8.onnx"
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
INPUT_DESCRIPTION = f"float32 [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}]: grayscale face crops, pixels 0..255"
EXPORT_HINT = ("Write it with: python export.py --format onnx (or onnx-int8), or leave out --onnx: --backend onnx "
               "then builds the graph of the chosen models itself")
CALIBRATION_IMAGES, CALIBRATION_SEED, CALIBRATION_BATCH = 300, 0, 50
# The members' layers; Softmax and the weighted average stay float, so that the probabilities keep their
# resolution and sum to one (quantized, they came in steps of 1/256).
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Add"]


class EnsembleGraph(nn.Module):
    """The members and their weights as one network: float pixels 0..255 [N, 1, 48, 48] -> the weighted
    average of the members' softmax probabilities [N, classes]."""

    def __init__(self, models, weights):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("weights", torch.tensor(np.asarray(weights), dtype=torch.float32))

    def forward(self, pixels):
        images = pixels / 255  # the members were trained on [0, 1]; the graph takes raw pixel values
        probs = torch.stack([torch.softmax(member(images), dim=1) for member in self.members])
        return (probs * self.weights[:, None, None]).sum(0)


def metadata(description):
    """metadata_props entries (strings only) for a Description."""
    return {"format": FORMAT, "input": INPUT_DESCRIPTION, "classes": json.dumps(description.classes),
            "weights": json.dumps([round(float(w), 6) for w in description.weights]),
            "members": json.dumps(description.members), "tta": description.tta, "method": description.method,
            "precision": description.precision}


def parse_metadata(path, props):
    """The Description in an ONNX file's metadata_props, checked; UsageError naming the file otherwise."""
    try:
        if props.get("format") != FORMAT:
            raise ValueError(f"format {props.get('format')!r}, expected {FORMAT!r}")
        classes, weights, members = (json.loads(props[key]) for key in ("classes", "weights", "members"))
        if classes_problem(classes):
            raise ValueError(f"class list {classes!r}")
        if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)):
            raise ValueError(f"member list {members!r}")
        if not (isinstance(weights, list) and len(weights) == len(members) and all(map(is_weight, weights))
                and sum(weights) > 0):
            raise ValueError(f"weights {weights!r} for {len(members)} member(s)")
        if props["tta"] not in TTA_CHOICES:
            raise ValueError(f"tta {props['tta']!r}")
    except (KeyError, TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"{path} is not an ensemble exported by export.py ({type(error).__name__}: {error}). "
                         f"{EXPORT_HINT}") from error
    return Description(classes, np.asarray(weights, dtype=np.float64), members, props["tta"],
                       props.get("method", "unknown"), props.get("precision", "fp32"))


def set_metadata(model, description):
    """Our entries added to an onnx.ModelProto's metadata_props, keeping the exporter's and quantizer's."""
    import onnx
    existing = {prop.key: prop.value for prop in model.metadata_props}
    onnx.helper.set_model_props(model, {**existing, **metadata(description)})
    return model


def save_model(model, path):
    content = model.SerializeToString()
    write_atomic(path, lambda file: file.write(content))


def export_fp32(models, description, path):
    """Write the fp32 ensemble graph with its metadata to `path`: one file, any batch size, default opset."""
    graph = EnsembleGraph([model.float().eval() for model in models], description.weights).eval()
    example = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE) * 255  # batch 2: torch.export specialises a batch of 1
    program = torch.onnx.export(graph, (example,), dynamo=True, external_data=False, verbose=False,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    save_model(set_metadata(program.model_proto, description), path)


class CalibrationImages:
    """Batches of float pixels for quantize_static, which asks for them with get_next() until None.
    onnxruntime's CalibrationDataReader accepts any class with get_next (its subclass hook), so this
    module does not have to import onnxruntime to define it."""

    def __init__(self, images):
        self.batches = iter([{INPUT_NAME: images[start:start + CALIBRATION_BATCH]}
                             for start in range(0, len(images), CALIBRATION_BATCH)])

    def get_next(self):
        return next(self.batches, None)


def calibration_images(train_images, count=CALIBRATION_IMAGES, seed=CALIBRATION_SEED):
    """A seeded choice of `count` training images (uint8 [N, 1, 48, 48]) as float32 pixels."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(train_images), size=min(count, len(train_images)), replace=False))
    return train_images[torch.from_numpy(chosen)].numpy().astype(np.float32)


def quantize_int8(fp32_path, int8_path, images, scratch):
    """A statically quantized copy of the fp32 graph (QDQ, per-channel int8 weights, uint8 activations,
    ranges calibrated on `images`), with the same metadata and precision int8."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = Path(scratch) / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph fusions, as quantize_static asks
    # reduce_range (7-bit weights): on CPUs without VNNI, ONNX Runtime's u8 x s8 kernels add pairs of products
    # in saturating 16-bit sums (VPMADDUBSW), which cost this ensemble points of accuracy on AVX2-only CPUs
    # and none on VNNI ones (docs/log.md); 7-bit weights cannot saturate, so the file answers alike on both.
    quantize_static(str(prepared), str(int8_path), CalibrationImages(images), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS)
    model = onnx.load(str(int8_path))
    description = open_session(fp32_path)[1]._replace(precision="int8")
    save_model(set_metadata(model, description), int8_path)


def load_errors():
    """The exceptions onnxruntime raises for a file it cannot load; they derive from Exception alone."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    return state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile, \
        state.NotImplemented, state.RuntimeException


def check_signature(path, session, description):
    """One float32 input `pixels` [N, 1, 48, 48] and one output `probabilities` [N, classes], as many classes
    as the metadata lists."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [(i.name, i.type, i.shape[1:]) for i in inputs] != [(INPUT_NAME, "tensor(float)", [1, IMAGE_SIZE, IMAGE_SIZE])] \
            or [(o.name, o.shape[-1]) for o in outputs] != [(OUTPUT_NAME, len(description.classes))]:
        found = [(i.name, i.type, i.shape) for i in inputs], [(o.name, o.type, o.shape) for o in outputs]
        raise UsageError(f"{path} does not take {INPUT_DESCRIPTION} and return {len(description.classes)} class "
                         f"probabilities (inputs, outputs: {found}). {EXPORT_HINT}")


def open_session(path, threads=None):
    """(an onnxruntime CPU session, the file's Description); UsageError naming the file when it is missing,
    not ONNX, or not an ensemble exported by export.py."""
    import onnxruntime
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no ONNX file {path}. {EXPORT_HINT}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, one per physical core
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except load_errors() as error:
        raise UsageError(f"cannot read {path} as an ONNX model ({str(error).strip()}). {EXPORT_HINT}") from error
    description = parse_metadata(path, session.get_modelmeta().custom_metadata_map)
    check_signature(path, session, description)
    return session, description


def session_forward(session):
    """A Predictor's forward function for an ensemble graph opened by open_session: float pixels 0..255
    [B, 1, 48, 48] (a CPU tensor) -> the ensemble's probabilities [B, classes]."""
    def forward(pixels):
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: pixels.contiguous().numpy()})[0])
    return forward


BACKENDS = ["auto", "onnx", "torch"]


def add_backend_flags(parser, default="auto"):
    """--backend and --onnx, for predict.py (default auto) and evaluate.py (default torch: its report scores
    each member, which one graph of the ensemble does not give)."""
    add_backend_flag(parser, default)
    parser.add_argument("--onnx", default=None, metavar="PATH",
                        help="with --backend onnx: run this ONNX file (export.py --format onnx, or onnx-int8, writes a "
                             "scored one) instead of the chosen models' graph; unset: the chosen models' graph")


def add_backend_flag(parser, default="auto"):
    """--backend alone, for app.py, which serves the chosen models only."""
    choices = BACKENDS if default == "auto" else ["onnx", "torch"]
    parser.add_argument("--backend", default=default, choices=choices,
                        help="onnx: the ensemble as one ONNX graph run by ONNX Runtime on CPU: the int8 graph its "
                             "ensemble.json names (the shipped weights/ensemble-int8.onnx), else the members' fp32 "
                             "graph, built on first use in seconds and kept in .cache/onnx/; "
                             "torch: the models run by PyTorch (--device and --precision apply to torch only)"
                             + ("; auto: onnx where --device resolves to the CPU, torch on a GPU" if "auto" in choices
                                else ""))


def check_backend_flags(backend, onnx_file, named):
    """UsageError for --onnx with --backend torch, or beside `named`, the flags given that name models:
    an ONNX file brings its own ensemble."""
    if onnx_file and backend == "torch":
        raise UsageError(f"--onnx {onnx_file} is run by ONNX Runtime, not torch: add --backend onnx")
    if onnx_file and named:
        raise UsageError(f"--onnx {onnx_file} runs the ensemble in that file, and {' and '.join(named)} name other "
                         "models: leave them out, or leave out --onnx to build their graph")
