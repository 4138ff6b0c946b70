// Keyboard shortcuts and time-to-vote for the task page. Plain JavaScript, no build step.
// 1 / 2 pick the answer shown in that slot, T tie, B both bad (rating tasks: 1..7),
// Enter submits (Ctrl+Enter inside the note), S skips, U undoes the last vote.
(function () {
  "use strict";
  var form = document.getElementById("vote-form");
  var started = performance.now();

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

  if (form) {
    form.addEventListener("change", markChosen);
    form.addEventListener("submit", function () {
      form.elements.time_ms.value = String(Math.round(performance.now() - started));
    });
  }

  document.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && form) {
      if (!inTextField(e.target) || e.ctrlKey || e.metaKey) {
        e.preventDefault();
        submitVote();
      }
      return;
    }
    if (inTextField(e.target) || e.ctrlKey || e.metaKey || e.altKey) return;
    var key = e.key.toLowerCase();
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
    if (!form) return;
    var input = form.querySelector('input[data-key="' + key + '"]');
    if (input) {
      e.preventDefault();
      input.checked = true;
      markChosen();
    }
  });
})();
