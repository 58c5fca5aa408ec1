set -o pipefail
export PYTHONUNBUFFERED=1 LOWBIT_FIXTURES=$PWD/fx
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl || echo "gemlite install failed"
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 230 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_kernels_gemm.py tests/test_kernels_w4.py tests/test_kernels_w8a8.py tests/test_quantize_device.py tests/test_quantize_exact.py -k "gpu or producer or w8a8 or int8 or quant or device or modelopt" -rfEs 2>&1 | tee $OUT/tests.txt
timeout 60 python3 rootcause.py 2>&1 | tee $OUT/rootcause.txt
timeout 25 python3 actq_time.py new 2>&1 | tee $OUT/actq.txt
(cd ../.. && PYTHONPATH=. timeout 25 python3 .carry/kern14/actq_time.py old) 2>&1 | tee -a $OUT/actq.txt
PYTHONPATH=.:/tmp/site timeout 80 python3 benchmarks/kernels.py --shapes a3b_expert_down,a3b_o --ms 1,16 2>&1 | tee $OUT/bench.txt
