"""The Hub stage: push a merged folder to the Hugging Face Hub, and the workflows built on it.

One job per module:

    retry.py    PushError; Hub calls retried with backoff, failures made one-line advice, tokens redacted
    repo.py     the target repo's lifetime: its name, the token's right to write there, create, discard
    commits.py  commits in a safe order (data first, index last), each applied once, stale files deleted
    card.py     the model card (README.md), and telling one nobody edited from one someone did
    pusher.py   HubPusher: uploads files while they are produced, then commits them; push_folder
    publish.py  merge while pushing; the seed workflow's API and its hf_upload: config
    watch.py    the sidecar that merges and pushes each new checkpoint of a training run

Only publish.py and watch.py know about checkpoints (they call the merge); the rest works on files.
Nothing here is imported by ``import streammerge`` or by a plain merge: huggingface_hub is loaded by
the first push.
"""
