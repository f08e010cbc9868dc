"""Orthanc Python plugin: when an MR series becomes stable, have ian-node segment it.

Runs inside Debian's Orthanc with its embedded Python and no virtual environment, so it imports only
the standard library and `orthanc`. Settings come from the "IanNode" section of Orthanc's
configuration (see orthanc/orthanc.json):

- "Mode": "push" sends the series to the node by C-STORE (`/modalities/{Modality}/store`, as an
  asynchronous Orthanc job); "pull" POSTs the node's HTTP trigger with the Orthanc series ID, and the
  node fetches the instances through Orthanc's REST API and uploads the SEG back.
- "Modality": the DicomModalities entry of the node (push).
- "NodeUrl", "NodeToken": the node's HTTP API and its optional bearer token (pull).
- "Modalities" (default ["MR"]), "SeriesDescriptionPattern" (default ".*"), "MinInstances" (default 1).

The change callback only enqueues; a worker thread does the REST calls, as the Orthanc book advises,
so Orthanc is never blocked. `POST /ian-node/series/{id}/segment` re-triggers a series by hand.
A series is triggered once per distinct instance set: the fingerprint of what was sent is kept in the
series' metadata, so a series that stabilises again unchanged is not sent twice.
"""

import hashlib
import json
import queue
import re
import threading
import urllib.error
import urllib.request

import orthanc

SECTION = "IanNode"
#: User metadata slot that records the fingerprint of the instance set last triggered.
METADATA = "IanNodeTriggered"
#: SOP classes the node segments: MR Image Storage and Enhanced MR Image Storage.
IMAGE_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"}
_STOP = object()


def _settings():
    section = json.loads(orthanc.GetConfiguration()).get(SECTION, {})
    mode = section.get("Mode", "push")
    if mode not in ("push", "pull"):
        raise ValueError('IanNode.Mode must be "push" or "pull", got %r' % (mode,))
    return {
        "mode": mode,
        "modality": section.get("Modality", "ian-node"),
        "node_url": section.get("NodeUrl", "http://127.0.0.1:8080").rstrip("/"),
        "node_token": section.get("NodeToken", ""),
        "modalities": set(section.get("Modalities", ["MR"])),
        "description": re.compile(section.get("SeriesDescriptionPattern", ".*")),
        "min_instances": int(section.get("MinInstances", 1)),
        "timeout": float(section.get("TimeoutSeconds", 30)),
    }


SETTINGS = _settings()
_jobs = queue.Queue()


def _get_json(uri):
    return json.loads(orthanc.RestApiGet(uri))


def _fingerprint(instance_ids):
    return hashlib.sha256("\n".join(sorted(instance_ids)).encode()).hexdigest()


def _selection(series_id):
    """(instance ids, reason): ids is None when the series must not be sent, with the reason."""
    series = _get_json("/series/%s" % series_id)
    tags = series.get("MainDicomTags", {})
    modality = tags.get("Modality", "")
    if modality not in SETTINGS["modalities"]:
        return None, "modality %r not selected" % modality
    description = tags.get("SeriesDescription", "")
    if not SETTINGS["description"].search(description):
        return None, "series description does not match"
    instances = series.get("Instances", [])
    if len(instances) < SETTINGS["min_instances"]:
        return None, "%d instances, fewer than %d" % (len(instances), SETTINGS["min_instances"])
    sop_class = orthanc.RestApiGet("/instances/%s/metadata/SopClassUid" % instances[0]).decode().strip()
    if sop_class not in IMAGE_SOP_CLASSES:
        return None, "SOP class %s is not an MR image" % sop_class
    return instances, ""


def _already_sent(series_id, fingerprint):
    try:
        return orthanc.RestApiGet("/series/%s/metadata/%s" % (series_id, METADATA)).decode() == fingerprint
    except Exception:  # orthanc.OrthancException when the metadata is absent
        return False


def _send(series_id):
    if SETTINGS["mode"] == "push":
        body = {"Resources": [series_id], "Asynchronous": True, "Synchronous": False}
        answer = json.loads(orthanc.RestApiPost("/modalities/%s/store" % SETTINGS["modality"], json.dumps(body)))
        return "Orthanc job %s" % answer.get("ID", "?")
    request = urllib.request.Request(
        SETTINGS["node_url"] + "/jobs",
        data=json.dumps({"source": "orthanc", "series": series_id}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if SETTINGS["node_token"]:
        request.add_header("Authorization", "Bearer " + SETTINGS["node_token"])
    with urllib.request.urlopen(request, timeout=SETTINGS["timeout"]) as response:
        answer = json.loads(response.read() or b"{}")
    return "node job %s" % answer.get("id", "?")


def process(series_id, force=False):
    """Send one series to the node unless it is not selected or was already sent unchanged."""
    instances, reason = _selection(series_id)
    if instances is None:
        orthanc.LogInfo("ian-node: series %s not sent: %s" % (series_id, reason))
        return {"series": series_id, "sent": False, "reason": reason}
    fingerprint = _fingerprint(instances)
    if not force and _already_sent(series_id, fingerprint):
        orthanc.LogInfo("ian-node: series %s already sent unchanged" % series_id)
        return {"series": series_id, "sent": False, "reason": "already sent unchanged"}
    what = _send(series_id)
    orthanc.RestApiPut("/series/%s/metadata/%s" % (series_id, METADATA), fingerprint)
    orthanc.LogWarning("ian-node: series %s sent (%s mode, %s)" % (series_id, SETTINGS["mode"], what))
    return {"series": series_id, "sent": True, "detail": what}


def _worker():
    while True:
        series_id = _jobs.get()
        if series_id is _STOP:
            return
        try:
            process(series_id)
        except urllib.error.URLError as exc:
            orthanc.LogError("ian-node: series %s: node unreachable: %s" % (series_id, exc))
        except Exception as exc:  # keep the worker alive whatever one series does
            orthanc.LogError("ian-node: series %s failed: %s: %s" % (series_id, type(exc).__name__, exc))


def on_change(change_type, level, resource_id):
    """Only enqueue: never block Orthanc's callback."""
    if change_type == orthanc.ChangeType.STABLE_SERIES:
        _jobs.put(resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        _jobs.put(_STOP)


def on_segment(output, uri, **request):
    """POST /ian-node/series/{id}/segment: re-trigger a series by hand (sent even if unchanged)."""
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    series_id = request["groups"][0]
    try:
        answer = process(series_id, force=True)
    except urllib.error.URLError as exc:
        orthanc.LogError("ian-node: series %s: node unreachable: %s" % (series_id, exc))
        output.SendHttpStatus(502, "node unreachable: %s" % exc)
        return
    except Exception as exc:
        orthanc.LogError("ian-node: series %s failed: %s: %s" % (series_id, type(exc).__name__, exc))
        output.SendHttpStatus(500, "%s: %s" % (type(exc).__name__, exc))
        return
    output.AnswerBuffer(json.dumps(answer), "application/json")


threading.Thread(target=_worker, name="ian-node-trigger", daemon=True).start()
orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/ian-node/series/([0-9a-f-]+)/segment", on_segment)
