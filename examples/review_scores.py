"""Score 4,000 product reviews, one slow call at a time, resumably.

    python examples/review_scores.py            # Ctrl-C whenever you like, then run again
    python examples/review_scores.py --fresh    # start over (move_checkpoint moves the old one aside)

The reviews are generated (deterministically) into ``reviews.jsonl`` beside the
checkpoint on the first run; ``score`` stands in for an LLM or HTTP call by sleeping a
few milliseconds. Each run first prints its plan (what is done, what is left), then
works through what is left, and finally prints a small summary and the run report.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Iterator

from snapperable import Snapper, SQLiteSnapshotStorage, move_checkpoint

POSITIVE = {"great", "love", "excellent", "sturdy", "fast", "perfect", "happy"}
NEGATIVE = {"broken", "slow", "awful", "refund", "late", "flimsy", "sad"}
FILLER = ["the", "box", "arrived", "and", "it", "works", "for", "my", "kid", "daily", "price", "color"]
CALL_SECONDS = 0.004  # a stand-in for the latency of a remote model


def make_reviews(path: Path, count: int = 4000) -> None:
    rng = random.Random(42)
    words = sorted(POSITIVE | NEGATIVE) + FILLER * 3
    with path.open("w") as out:
        for i in range(count):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))
            out.write(json.dumps({"id": f"r{i:05d}", "stars": rng.randint(1, 5), "text": text}) + "\n")


def read_reviews(path: Path) -> Iterator[dict[str, object]]:
    """Streams the file: the Snapper never needs the whole dataset in memory."""
    with path.open() as lines:
        for line in lines:
            yield json.loads(line)


def review_id(review: dict[str, object]) -> object:
    return review["id"]


def score(review: dict[str, object]) -> dict[str, object]:
    time.sleep(CALL_SECONDS)
    words = str(review["text"]).split()
    polarity = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    liked = str(review["stars"]) in ("4", "5")
    return {"id": review["id"], "polarity": polarity, "agrees_with_stars": (polarity > 0) == liked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="review_scores_run", help="where the data and checkpoint live")
    parser.add_argument("--fresh", action="store_true", help="move an old checkpoint aside first")
    args = parser.parse_args()
    workdir = Path(args.dir)
    workdir.mkdir(exist_ok=True)
    data = workdir / "reviews.jsonl"
    checkpoint = workdir / "scores.db"
    if not data.exists():
        make_reviews(data)
    if args.fresh and checkpoint.exists():
        # With its -wal, -shm and lock file, after copying the WAL in; refused while a
        # run holds it. snapperable itself never deletes a checkpoint.
        aside = move_checkpoint(checkpoint, checkpoint.with_suffix(f".{int(time.time())}.db"))
        print(f"moved the old checkpoint to {aside}")

    storage: SQLiteSnapshotStorage[dict[str, object]] = SQLiteSnapshotStorage(str(checkpoint))
    # plan() reads the whole iterable, so it gets a generator of its own
    plan = Snapper(read_reviews(data), score, snapshot_storage=storage, key=review_id).plan()
    print(f"plan: {plan}")
    snapper = Snapper(read_reviews(data), score, snapshot_storage=storage, key=review_id)
    started = time.monotonic()
    try:
        with snapper:
            snapper.start()
            results = snapper.load()
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.monotonic() - started:.1f} s; everything processed is saved."
              " Run the same command again to resume.")
        raise SystemExit(130)
    agree = sum(bool(r["agrees_with_stars"]) for r in results)
    print(f"done in {time.monotonic() - started:.1f} s: {len(results)} reviews scored, "
          f"{agree} agree with their stars")
    print(snapper.generate_report())


if __name__ == "__main__":
    main()
