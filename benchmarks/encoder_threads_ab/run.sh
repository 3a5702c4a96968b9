export EVAL_DIR=/work/shared/eval
for i in 1 2; do
  cd /tmp/before && /work/main/.venv/bin/python -m benchmarks.peers --engines service --out /tmp/exp/b_$i > /tmp/exp/b_$i.log 2>&1
  cd /work/main && .venv/bin/python -m benchmarks.peers --engines service --out /tmp/exp/a_$i > /tmp/exp/a_$i.log 2>&1
done
cd /tmp/before && /work/main/.venv/bin/python -m benchmarks.stream --variants int8+flash --out /tmp/exp/sb > /tmp/exp/sb.log 2>&1
cd /work/main && .venv/bin/python -m benchmarks.stream --variants int8+flash --out /tmp/exp/sa > /tmp/exp/sa.log 2>&1
echo done > /tmp/exp/ab2.done
