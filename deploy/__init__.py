"""What runs on the device: ``runner.py`` (standard library + numpy + a TFLite runtime).

Ships in the wheel as ``edgeq._device``; the host reads the runner's source with
``importlib.resources.files("edgeq._device")`` and sends it to the device.
Nothing here may import edgeq.
"""
