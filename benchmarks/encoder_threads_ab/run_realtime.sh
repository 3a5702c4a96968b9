for n in before_1 before_2; do
  cd /tmp/before && /work/main/.venv/bin/python -m loadtest.realtime --targets base --sessions 4,8 --seconds 60 --eval-dir /work/shared/eval --out /tmp/exp/rt2 --name $n > /tmp/exp/rt2/$n.log 2>&1
done
cd /work/main && .venv/bin/python -m loadtest.realtime --targets base --sessions 4,8 --seconds 60 --out /tmp/exp/rt2 --name after_3 > /tmp/exp/rt2/after_3.log 2>&1
echo done > /tmp/exp/rt2/done3
