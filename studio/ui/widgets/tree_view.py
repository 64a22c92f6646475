"""The module tree with a checkbox on every node: a gr.HTML subclass.

The tree's HTML comes from a separate `tree_html` prop, not from `value`, so ticking boxes
(which changes `value`) never re-renders the template: open folders stay open, and the
checkbox states are set from `value` in JavaScript. Only LoRA-able leaves carry a selection
key; a parent box is derived (ticked, unticked or indeterminate) from the leaves below it.
"""

from __future__ import annotations

import html

import gradio as gr

from studio.models.tree import ModelTree, human

JS = r"""
const leafBoxes = () => Array.from(element.querySelectorAll('input[data-leaf]'));
function refreshGroups() {
  const groups = Array.from(element.querySelectorAll('input[data-group]')).reverse();
  for (const g of groups) {
    const leaves = g.closest('li').querySelectorAll('input[data-leaf]');
    let n = 0;
    leaves.forEach(c => { if (c.checked) n++; });
    g.checked = leaves.length > 0 && n === leaves.length;
    g.indeterminate = n > 0 && n < leaves.length;
  }
}
function applyValue() {
  const chosen = new Set(Array.isArray(props.value) ? props.value : []);
  leafBoxes().forEach(c => { c.checked = chosen.has(c.dataset.key); });
  refreshGroups();
}
element.addEventListener('change', (e) => {
  const box = e.target;
  if (!box.matches || !box.matches('input[type=checkbox]')) return;
  if (box.dataset.group !== undefined) {
    box.closest('li').querySelectorAll('input[data-leaf]').forEach(c => { c.checked = box.checked; });
  }
  refreshGroups();
  props.value = leafBoxes().filter(c => c.checked).map(c => c.dataset.key);
});
// A click on a checkbox inside <summary> must not also open or close the folder.
element.addEventListener('click', (e) => {
  if (e.target.matches && e.target.matches('summary input[type=checkbox]')) e.stopPropagation();
}, true);
watch('value', applyValue);
watch('tree_html', applyValue);
applyValue();
"""

CSS = """
.mt { font-family: var(--font-mono); font-size: 13px; line-height: 1.55; max-height: 560px; overflow: auto; }
.mt ul { list-style: none; margin: 0; padding-left: 1.1em; }
.mt > ul { padding-left: 0; }
.mt summary { cursor: pointer; }
.mt .cls { color: var(--body-text-color-subdued); }
.mt .dim { color: var(--body-text-color-subdued); font-size: 12px; }
.mt .shape { color: var(--color-accent); }
.mt .rep { font-weight: 600; }
.mt .leaf-off { opacity: 0.55; padding-left: 1.45em; }
.mt input { margin-right: 0.35em; vertical-align: middle; }
"""


class ModuleTree(gr.HTML):
    """value: list of selected leaf keys (folded paths such as model.layers.0-3.self_attn.q_proj)."""

    def __init__(self, value=None, tree_html: str = "", **kwargs):
        super().__init__(value=value or [], html_template="<div class='mt'>${tree_html}</div>",
                         css_template=CSS, js_on_load=JS, tree_html=tree_html, **kwargs)
        # gradio builds the page config from the attributes named like __init__'s parameters; without
        # this one, gr.HTML's __getattr__ answers an event-listener partial bound to this component
        # (the name is quoted in the JS), and every page load deep-copies the whole app through it,
        # leaving half-copied event loops whose __del__ fills the log with "'_UnixSelectorEventLoop'
        # object has no attribute '_closed'".
        self.tree_html = tree_html

    def preprocess(self, payload):
        return list(payload) if isinstance(payload, (list, tuple)) else []

    def postprocess(self, value):
        return list(value) if isinstance(value, (list, tuple, set)) else []

    def api_info(self):
        return {"type": "array", "items": {"type": "string"}}


def leaf_index(tree: ModelTree) -> dict[str, list[str]]:
    """Selection key of every LoRA-able leaf -> the real module paths it stands for."""
    out: dict[str, list[str]] = {}

    def walk(node: dict, key: str, real: list[str]) -> None:
        for kid in node.get("children", []):
            k = f"{key}.{kid['name']}" if key else kid["name"]
            if kid["repeat"] > 1:
                subs = [r + "." + m.rsplit(".", 1)[-1] if r else m.rsplit(".", 1)[-1] for r in real for m in kid["members"]]
            else:
                subs = [f"{r}.{kid['name']}" if r else kid["name"] for r in real]
            if kid.get("children"):
                walk(kid, k, subs)
            elif kid["lora_targetable"]:
                out[k] = subs

    walk(tree.nodes, "", [""])
    return out


def render_tree(tree: ModelTree, open_depth: int = 5) -> str:
    """Nested <details> lists; folders down to `open_depth` start open."""
    parts: list[str] = []

    def label(node: dict) -> str:
        e = html.escape
        if node["repeat"] > 1:
            head = f"<span class='rep'>({e(node['name'])}) {node['repeat']} ×</span> <span class='cls'>{e(node['class'])}</span>"
        else:
            head = f"{e(node['name'])} <span class='cls'>{e(node['class'])}</span>"
        if node.get("kind"):
            head += f" <span class='shape'>{node['in_features']}→{node['out_features']}</span>"
        if node["params"]:
            each = f", {human(node['params'] // node['repeat'])} each" if node["repeat"] > 1 else ""
            head += f" <span class='dim'>{human(node['params'])}{each}</span>"
        return head

    def has_lora(node: dict) -> bool:
        return node["lora_targetable"] and not node.get("children") or any(has_lora(k) for k in node.get("children", []))

    def walk(node: dict, key: str, depth: int) -> None:
        parts.append("<ul>")
        for kid in node.get("children", []):
            k = f"{key}.{kid['name']}" if key else kid["name"]
            ek = html.escape(k, quote=True)
            if kid.get("children"):
                box = "<input type='checkbox' data-group title='select all LoRA-able modules below'>" if has_lora(kid) else ""
                opened = " open" if depth < open_depth else ""
                parts.append(f"<li><details{opened}><summary>{box}{label(kid)}</summary>")
                walk(kid, k, depth + 1)
                parts.append("</details></li>")
            elif kid["lora_targetable"]:
                parts.append(f"<li><label><input type='checkbox' data-leaf data-key='{ek}'>{label(kid)}</label></li>")
            else:
                parts.append(f"<li class='leaf-off'>{label(kid)}</li>")
        parts.append("</ul>")

    root = tree.nodes
    parts.append(f"<div><b>{html.escape(root['class'])}</b> <span class='dim'>{human(root['params'])} parameters</span></div>")
    walk(root, "", 1)
    return "".join(parts)
