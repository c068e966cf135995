"""Send one camera rig (8 images, camera order) to the served perception model.

    python serve/examples/autonomous_client.py rig_folder/ [--url http://127.0.0.1:8000/autonomous]

The folder holds cam0.png ... cam7.png (the rig layout `deepfleet prepare` imports).
"""

import argparse
import base64
from pathlib import Path

import requests

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("rig", type=Path, help="folder with cam0.png ... cam7.png")
p.add_argument("--url", default="http://127.0.0.1:8000/autonomous")
p.add_argument("--threshold", type=float, default=0.5, help="smallest object score returned")
a = p.parse_args()

images = [base64.b64encode((a.rig / f"cam{i}.png").read_bytes()).decode() for i in range(8)]
r = requests.post(f"{a.url}/predict", json={"images": images, "score_threshold": a.threshold}, timeout=60)
if r.status_code != 200:
    raise SystemExit(f"error {r.status_code}: {r.json().get('detail', r.text)}")
answer = r.json()
for cam in answer["cameras"]:
    objects = ", ".join(
        f"{o['label']} {o['score']:.2f} at {[round(v) for v in o['box']]}" for o in cam["objects"]
    )
    depth = answer["depth"]["metres"][cam["camera"]]
    nearest = min(min(row) for row in depth)
    print(
        f"camera {cam['camera']}: {len(cam['lanes'])} lanes, nearest surface {nearest:.1f} m; {objects or 'no objects'}"
    )
print(f"model {answer['version']}")
