"""Grade a fundus photograph with the served retinopathy model.

python serve/examples/retinopathy_client.py photo.jpeg [--url http://127.0.0.1:8000/retinopathy]
"""

import argparse
import base64
import json

import requests

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("image", help="PNG or JPEG fundus photograph")
p.add_argument("--url", default="http://127.0.0.1:8000/retinopathy")
a = p.parse_args()

with open(a.image, "rb") as f:
    body = {"image": base64.b64encode(f.read()).decode()}
r = requests.post(f"{a.url}/predict", json=body, timeout=30)
if r.status_code != 200:  # 4xx: the request was wrong, and the detail says how
    raise SystemExit(f"error {r.status_code}: {r.json().get('detail', r.text)}")
answer = r.json()
print(json.dumps(answer, indent=2))
print(
    f"grade {answer['grade']} ({answer['grade_name']}), "
    f"{'refer' if answer['referable'] else 'no referral'} (p={answer['referable_probability']:.2f}), "
    f"model {answer['version']}"
)
