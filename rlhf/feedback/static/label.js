// Keyboard shortcuts and time-to-vote for the task page. Plain JavaScript, no build step.
// 1 / 2 pick the answer shown in that slot, T tie, B both bad (rating tasks: 1..7); an axis key then
// 1 / = / 2 judges that axis; ranking tasks: the answers' numbers best first, 0 clears; W rewrite box,
// N note, G guidelines, ? help page; Enter submits (Ctrl+Enter inside a text box), Esc leaves a text box;
// S skips, U undoes the last vote or skip.
(function () {
  "use strict";
  var form = document.getElementById("vote-form");
  var started = performance.now();
  var pendingAxis = null;  // the axis whose key was pressed last, waiting for 1 / = / 2

  function inTextField(el) {
    return el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "radio") || el.tagName === "SELECT");
  }

  function submitVote() {
    if (form && form.reportValidity()) {
      form.requestSubmit();
    }
  }

  function markChosen() {
    if (!form) return;
    var answers = form.querySelectorAll(".answer");
    for (var i = 0; i < answers.length; i++) {
      var radio = answers[i].querySelector("input[type=radio]");
      answers[i].classList.toggle("chosen", !!(radio && radio.checked));
    }
  }

  function axisRows() {
    var out = {};
    if (!form) return out;
    var heads = form.querySelectorAll("#axes th[scope=row]");
    for (var i = 0; i < heads.length; i++) {
      var kbd = heads[i].querySelector("kbd");
      if (kbd) out[kbd.textContent.trim().toLowerCase()] = heads[i].parentNode;
    }
    return out;
  }

  function rankKey(key) {
    // A typed answer takes the best rank no answer holds yet, by key or with the mouse: a rank picked in a
    // box counts, so typing the rest never gives an answer a rank another already holds.
    var selects = form.querySelectorAll("select[data-slot]");
    var used = {};
    for (var i = 0; i < selects.length; i++) {
      if (key === "0") selects[i].value = "";
      if (selects[i].value !== "") used[selects[i].value] = true;
    }
    if (key === "0") return true;
    var slot = parseInt(key, 10);
    var select = form.querySelector('select[data-slot="' + slot + '"]');
    if (!(slot >= 1 && slot <= selects.length) || select.value !== "") return false;
    var next = 1;
    while (used[String(next)]) next++;
    select.value = String(next);
    return true;
  }

  function toggleDetails(id, focusId) {
    var box = document.getElementById(id);
    if (!box) return false;
    box.open = focusId ? true : !box.open;
    if (focusId) document.getElementById(focusId).focus();
    return true;
  }

  if (form) {
    form.addEventListener("change", markChosen);
    form.addEventListener("click", function (e) {  // a click anywhere on an answer picks it
      var answer = e.target.closest(".answer");
      if (!answer || e.target.closest("a, select, input") || String(window.getSelection())) return;
      var radio = answer.querySelector("input[type=radio]");
      if (radio) { radio.checked = true; markChosen(); }
    });
    form.addEventListener("submit", function () {
      form.elements.time_ms.value = String(Math.round(performance.now() - started));
    });
  }

  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && inTextField(e.target)) {
      e.target.blur();
      return;
    }
    if (e.key === "Enter" && form) {
      // A focused button or link does its own thing (Enter on Skip skips); elsewhere Enter submits.
      if (e.target.tagName === "BUTTON" || e.target.tagName === "A" || e.target.tagName === "SUMMARY") return;
      if (!inTextField(e.target) || e.ctrlKey || e.metaKey) {
        e.preventDefault();
        submitVote();
      }
      return;
    }
    if (inTextField(e.target) || e.ctrlKey || e.metaKey || e.altKey) return;
    var key = e.key.toLowerCase();
    if (pendingAxis) {
      var column = {"1": 1, "=": 2, "2": 3}[key];
      var row = pendingAxis;
      pendingAxis = null;
      if (column) {
        e.preventDefault();
        row.querySelectorAll("input[type=radio]")[column - 1].checked = true;
        return;
      }
    }
    if (key === "u") {
      var undo = document.getElementById("undo-form");
      if (undo) { e.preventDefault(); undo.requestSubmit(); }
      return;
    }
    if (key === "s") {
      var skip = document.getElementById("skip-form");
      if (skip) { e.preventDefault(); skip.requestSubmit(); }
      return;
    }
    if (key === "?") {
      var help = document.getElementById("help-link");
      if (help) { e.preventDefault(); help.click(); }
      return;
    }
    if (key === "g" && toggleDetails("guidelines")) { e.preventDefault(); return; }
    if (key === "w" && toggleDetails("rewrite-box", "rewrite")) { e.preventDefault(); return; }
    if (key === "n" && document.getElementById("note")) {
      e.preventDefault();
      document.getElementById("note").focus();
      return;
    }
    if (!form) return;
    var axes = axisRows();
    if (axes[key]) {
      e.preventDefault();
      pendingAxis = axes[key];
      return;
    }
    if (form.dataset.kind === "ranking") {
      if (rankKey(key)) e.preventDefault();
      return;
    }
    var input = form.querySelector('input[data-key="' + key + '"]');
    if (input) {
      e.preventDefault();
      input.checked = true;
      markChosen();
    }
  });
})();
