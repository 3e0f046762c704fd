"""Renders conversations.json through transformers' own chat-template environment and writes
expected.json, the reference the Rust tests compare with. Today's date (strftime_now) is
replaced with @@TODAY@@ so the file is stable."""
import copy, datetime, json, os

from transformers.utils.chat_template_utils import render_jinja_template

HERE = os.path.dirname(os.path.abspath(__file__))
cases = json.load(open(os.path.join(HERE, "conversations.json")))
today = datetime.datetime.now().strftime("%d %b %Y")
expected = []
for case in cases:
    src = open(os.path.join(HERE, case["template"] + ".jinja")).read()
    messages = copy.deepcopy(case["messages"])
    # vLLM's _postprocess_messages: assistant tool-call arguments become dicts.
    for m in messages:
        for tc in m.get("tool_calls") or []:
            try:
                parsed = json.loads(tc["function"]["arguments"])
                if isinstance(parsed, dict):
                    tc["function"]["arguments"] = parsed
            except (ValueError, TypeError):
                pass
    try:
        rendered = render_jinja_template(
            conversations=[messages],
            tools=case["tools"],
            chat_template=src,
            add_generation_prompt=case["add_generation_prompt"],
            **case["special_tokens"],
            **case["extra"],
        )
        if isinstance(rendered, tuple):
            rendered = rendered[0]
        if isinstance(rendered, list):
            rendered = rendered[0]
        expected.append({"template": case["template"], "name": case["name"], "output": rendered.replace(today, "@@TODAY@@")})
    except Exception as e:  # raise_exception -> TemplateError
        expected.append({"template": case["template"], "name": case["name"], "error": str(e)})
with open(os.path.join(HERE, "expected.json"), "w") as f:
    json.dump(expected, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"wrote {len(expected)} cases")
