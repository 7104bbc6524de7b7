"""ddpm_deploy.export: ONNX export, diffusers import, fp16 calibration, TensorRT builds, Triton repositories (`ddpm-export`)."""
