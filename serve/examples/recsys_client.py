"""Rank candidate tracks for a listening session with the served recommender.

    python serve/examples/recsys_client.py --history t_1,t_2,t_3 --skipped t_2 \
        --candidates t_7,t_8,t_9 [--hour 21] [--context-type radio] [--url http://127.0.0.1:8000/recsys]
"""

import argparse
from datetime import date

import requests

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--history", required=True, help="track ids the session played, oldest first")
p.add_argument("--skipped", default="", help="those of them the listener skipped")
p.add_argument("--candidates", required=True, help="track ids to rank")
p.add_argument("--hour", type=int, default=12)
p.add_argument("--context-type", default="user_collection")
p.add_argument("--url", default="http://127.0.0.1:8000/recsys")
a = p.parse_args()

history, skipped = a.history.split(","), set(filter(None, a.skipped.split(",")))
body = {
    "history": [
        {
            "track_id": t,
            "skip_2": t in skipped,
            "not_skipped": t not in skipped,
            "hist_user_behavior_reason_end": "fwdbtn" if t in skipped else "trackdone",
        }
        for t in history
    ],
    "context": {
        "date": date.today().isoformat(),
        "hour_of_day": a.hour,
        "context_type": a.context_type,
        "session_position": len(history) + 1,
        "session_length": max(20, len(history) + 1),
    },
    "candidates": a.candidates.split(","),
}
r = requests.post(f"{a.url}/predict", json=body, timeout=30)
if r.status_code != 200:
    raise SystemExit(f"error {r.status_code}: {r.json().get('detail', r.text)}")
answer = r.json()
for t in answer["ranked"]:
    print(
        f"{t['rank']:3}. {t['track_id']}  play probability {t['play_probability']:.3f}{'  (new release)' if t['cold'] else ''}"
    )
print(f"model {answer['version']}")
