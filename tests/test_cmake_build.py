"""CMakeLists.txt builds the ops as a library that torch.ops.load_library can load."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD_AND_RUN = """
import sys, torch, torch.nn.functional as F
torch.ops.load_library(sys.argv[1])
x, w = torch.randn(2, 5, 9, 9), torch.randn(8, 1, 3, 3)
y = torch.ops.bsnas.masked_dwconv2d(x, w, 5, 2, 1, 1)
torch.testing.assert_close(y, F.conv2d(x, w[:5], None, 2, 1, 1, 5))
p = torch.randn(7, 8, 1, 1)
torch.testing.assert_close(torch.ops.bsnas.masked_pwconv2d(y, p, 5, 3), F.conv2d(y, p[:3, :5]))
print("ok")
"""


def _cmake_args():
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda:  # Caffe2's FindCUDA needs the toolkit and nvrtc spelled out
        home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={home}")
        nvrtc = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*",
                                       "lib", "libnvrtc.so*"))
        nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={os.path.realpath(nvrtc[0])}")
    return args


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_library_builds_and_loads(tmp_path):
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), *_cmake_args()],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    out = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lib = build / "libbsnas_ops.so"
    # Built with OpenMP, like setup.py's build: at::parallel_for in the kernels is header
    # code that would otherwise run on one thread.
    data = lib.read_bytes()
    assert b"GOMP_parallel" in data or b"__kmpc_fork_call" in data, "library built without OpenMP"
    run = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(lib)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
