"""The classic Keras transfer-learning recipe, as tutorials teach it, timed phase by phase.

    python benchmarks/keras_recipe.py DATA [--weights mobilenetv2_100.safetensors] [--json]
    python benchmarks/keras_recipe.py --check-cat --weights mobilenetv2_100.safetensors

DATA has ``train/`` and ``val/`` folders of class sub-folders. Runs in a process of its own (TensorFlow and torch
never share one); ``compare_keras.py`` starts it and reads the JSON line it prints. Needs ``pip install -e .[bench]``.

Keras' own ImageNet weights are a download, which fails on these machines, so MobileNetV2 is built with
``weights=None``. With ``--weights`` the same real ImageNet file headstart's ``mobilenetv2`` uses is copied in layer by
layer (both networks list the same 104 weighted layers in the same order), so the accuracy means something; speed
does not depend on the weight values either way. ``--check-cat`` shows the copy is right before anything is timed:
with the file's classifier copied in as well, the whole network must call scikit-image's ImageNet cat photo a cat.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

START = time.perf_counter()


def transplant(model, path: str) -> int:
    """Copy timm ``mobilenetv2_100`` weights (safetensors) into Keras' MobileNetV2, matching layers by order."""
    import numpy as np
    from safetensors.numpy import load_file

    sd = load_file(path)
    blocks = sorted({tuple(int(n) for n in k.split(".")[1:3]) for k in sd if k.startswith("blocks.")})
    names = ["conv_stem", "bn1"]
    for s, i in blocks:  # inverted residual: expand, depthwise, project; block 0 has no expansion
        ir = f"blocks.{s}.{i}.conv_pwl.weight" in sd
        names += [f"blocks.{s}.{i}.{n}" for n in (["conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"] if ir else ["conv_dw", "bn1", "conv_pw", "bn2"])]
    names += ["conv_head", "bn2"]
    keras_layers = [layer for layer in model.layers if layer.weights and layer.__class__.__name__ != "Dense"]
    if len(names) != len(keras_layers):
        raise ValueError(f"{path}: {len(names)} conv/BN layers, Keras MobileNetV2 has {len(keras_layers)}")
    for layer, k in zip(keras_layers, names):  # the same order in both networks
        w = sd[f"{k}.weight"]
        kind = layer.__class__.__name__
        if kind == "BatchNormalization":
            layer.set_weights([w, sd[f"{k}.bias"], sd[f"{k}.running_mean"], sd[f"{k}.running_var"]])
        else:  # torch (out, in/groups, h, w) -> Keras (h, w, in, out), depthwise (h, w, channels, 1)
            layer.set_weights([np.transpose(w, (2, 3, 0, 1) if kind == "DepthwiseConv2D" else (2, 3, 1, 0))])
    return len(keras_layers)


CATS = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}  # ImageNet classes a cat photo may rightly get


def check_cat(weights: str) -> dict:
    """Keras' whole MobileNetV2 (classifier included) with ``weights`` copied in, on the ImageNet cat photo.

    A wrong layer order or mixed-up BatchNorm statistics still train and still get a speed, but recognise nothing:
    the comparison's Keras accuracy is only real if this says cat."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from safetensors.numpy import load_file
    from skimage import data

    model = tf.keras.applications.MobileNetV2(include_top=True, weights=None, input_shape=(224, 224, 3))
    copied = transplant(model, weights)
    sd = load_file(weights)
    model.layers[-1].set_weights([sd["classifier.weight"].T, sd["classifier.bias"]])
    x = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), np.float32) / 127.5 - 1  # [-1, 1], as trained
    proba = model.predict(x[None], verbose=0)[0]
    top = int(proba.argmax())
    return {"layers": copied, "class": top, "name": CATS.get(top, f"ImageNet class {top}, not a cat"),
            "probability": round(float(proba[top]), 3), "ok": copied == 104 and top in CATS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?")
    ap.add_argument("--weights", help="timm mobilenetv2_100 safetensors file to copy in (default: random weights)")
    ap.add_argument("--check-cat", action="store_true",
                    help="only check the copied --weights on the cat photo: print one JSON line, exit 1 unless it is a cat")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON line with phase times and accuracy")
    args = ap.parse_args()
    if args.check_cat:
        if not args.weights:
            ap.error("--check-cat needs --weights")
        result = check_cat(args.weights)
        print(json.dumps(result))
        sys.exit(0 if result["ok"] else 1)
    if not args.data:
        ap.error("DATA is required")

    import numpy as np
    import tensorflow as tf
    from tensorflow.keras import layers
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    tf.keras.utils.set_random_seed(0)
    t = {"import_s": time.perf_counter() - START}

    # --- the recipe ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    train_gen = ImageDataGenerator(rescale=1 / 255, rotation_range=20, width_shift_range=0.2, height_shift_range=0.2,
                                   horizontal_flip=True)
    train = train_gen.flow_from_directory(os.path.join(args.data, "train"), target_size=(224, 224), batch_size=32)
    val = ImageDataGenerator(rescale=1 / 255).flow_from_directory(os.path.join(args.data, "val"), target_size=(224, 224),
                                                                  batch_size=32, shuffle=False)
    base = tf.keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3))
    copied = transplant(base, args.weights) if args.weights else 0
    base.trainable = False
    x = layers.GlobalAveragePooling2D()(base.output)
    x = layers.Dense(256, activation="relu")(x)
    out = layers.Dense(train.num_classes, activation="softmax")(x)
    model = tf.keras.Model(base.input, out)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    t["build_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.fit(train, epochs=args.epochs, verbose=0)
    t["frozen_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for layer in base.layers[-4:]:
        layer.trainable = True
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=args.ft_epochs, verbose=0)
    t["finetune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    proba = model.predict(val, verbose=0)
    t["predict_s"] = time.perf_counter() - t0
    t["total_s"] = time.perf_counter() - START

    result = {
        **{k: round(v, 3) for k, v in t.items()},
        "train_images": train.samples,
        "val_images": val.samples,
        "val_accuracy": float(np.mean(proba.argmax(1) == val.classes)),
        "weights": f"{copied} layers from {os.path.basename(args.weights)}" if args.weights else "random (weights=None)",
        "versions": f"tensorflow {tf.__version__}, keras {tf.keras.__version__}",
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
