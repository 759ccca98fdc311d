"""The payload of echoink's ``lmms_eval.models`` entry point. lmms-eval imports this module when it builds its
model registry, for every run, so it names the model class by path and imports nothing of echoink."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="echoink", simple_class_path="echoink.lmms_eval_plugin.model.EchoinkModel")
